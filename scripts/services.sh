#!/usr/bin/env bash
# start|stop the Docker engine and Redis. Starts only what does not already answer, and
# records what it started (pid files in the run directory) so `stop` stops exactly that.
source "$(dirname "$0")/common.sh"
private_run_dir

start_docker() {
  if docker_ok; then say "Docker engine answers"; return; fi
  command -v dockerd >/dev/null || die "dockerd is missing (run: make up)"
  say "starting a Docker engine (log: $RUN_DIR/dockerd.log)"
  nohup dockerd >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/dockerd.pid"
  wait_for docker_ok 60 || die "the Docker engine did not start; see $RUN_DIR/dockerd.log"
}

# gVisor (the `isolation: gvisor` tier): Debian's runsc, registered with the engine under
# TITAN_GVISOR_RUNTIME with --network=none (without it a network_mode=none container fails:
# "cannot run with network enabled in root network namespace") and --oci-seccomp (without
# it runsc ignores the container's seccomp profile, and a plugin may unshare namespaces in
# gVisor's kernel that runc refuses). The runtime is added to /etc/docker/daemon.json,
# other keys kept, an older registration without those arguments brought up to date; an
# engine this script started reloads it on SIGHUP. Another engine is told how, not touched.
GVISOR_ARGS='["--network=none","--oci-seccomp"]'
# A run of a gVisor plugin with an egress grant joins the egress network: a second
# registration, with --network=host: the Sentry's sockets are the host kernel's, in the
# container's own network namespace (which holds the internal bridge and nothing else).
# gVisor's netstack (--network=sandbox) fails to start on this kind of machine ("cannot
# run with network enabled in root network namespace", runsc 2022-12).
GVISOR_NET_ARGS='["--network=host","--oci-seccomp"]'
runtime_ok() {  # name, args (JSON)
  docker info --format "{{json (index .Runtimes \"$1\")}}" 2>/dev/null |
    /usr/bin/python3 -c 'import json,sys; want=json.loads(sys.argv[1]); got=json.load(sys.stdin) or {}; sys.exit(not set(want) <= set(got.get("runtimeArgs") or []))' "$2"
}

register_gvisor() {
  GVISOR="${TITAN_GVISOR_RUNTIME:-runsc}"
  GVISOR_NET="${TITAN_GVISOR_NET_RUNTIME:-runsc-net}"
  runtime_ok "$GVISOR" "$GVISOR_ARGS" && runtime_ok "$GVISOR_NET" "$GVISOR_NET_ARGS" && return
  local runsc; runsc="$(command -v runsc)" || {
    say "runsc is not installed: isolation: gvisor is unavailable (make up installs it)"; return; }
  /usr/bin/python3 - "/etc/docker/daemon.json" "$runsc" "$GVISOR" "$GVISOR_ARGS" "$GVISOR_NET" "$GVISOR_NET_ARGS" <<'PY'
import json, os, sys
path, runsc, *pairs = sys.argv[1:]
try:
    with open(path) as fh:
        conf = json.load(fh)
except FileNotFoundError:
    conf = {}
for name, args in zip(pairs[::2], pairs[1::2]):
    entry = conf.setdefault("runtimes", {}).setdefault(name, {"path": runsc})
    entry["runtimeArgs"] = [*(a for a in entry.get("runtimeArgs") or []
                              if a not in json.loads(args) and not a.startswith("--network=")),
                            *json.loads(args)]
os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
with open(path + ".titan", "w") as fh:
    json.dump(conf, fh, indent=2)
os.chmod(path + ".titan", 0o644)
os.replace(path + ".titan", path)
PY
  if pid_alive "$RUN_DIR/dockerd.pid"; then
    say "registering the gVisor runtimes $GVISOR and $GVISOR_NET with the engine (SIGHUP)"
    kill -HUP "$(cat "$RUN_DIR/dockerd.pid")"
    wait_for "runtime_ok $GVISOR '$GVISOR_ARGS' && runtime_ok $GVISOR_NET '$GVISOR_NET_ARGS'" 20 ||
      say "the engine did not load the gVisor runtimes; see $RUN_DIR/dockerd.log"
  else
    say "added runtimes $GVISOR and $GVISOR_NET to /etc/docker/daemon.json; this engine was" \
        "not started by make up: reload it (kill -HUP its dockerd) to enable isolation: gvisor"
  fi
}

# The egress proxy (manager/egress/proxy.py): Squid as its own uid on the internal network
# that runs with a net grant join; started (or its configuration reloaded) here when the
# operator's ceiling allows any network at all (TITAN_EGRESS_ALLOW: empty, no plugin has
# one, and no proxy is needed).
start_proxy() {
  [ -x "$PY" ] && [ -n "${TITAN_EGRESS_ALLOW:-}" ] || return 0
  "$PY" -m manager.egress.proxy start >&2 || die "the egress proxy did not start (above)"
}

# Redis runs with a password (anyone who can write to Redis can queue runs and forge
# bundles), with AOF, and under umask 077 (set in common.sh): its data directory and
# append-only files are root's alone (0700/0600), like everything else in the run
# directory. appendfsync everysec loses at most about one second of writes on a power loss
# or kernel crash, and nothing on a process crash; `always` loses nothing.
start_redis() {
  if redis_tls_wanted; then
    ha_url
    tls_certs
    redis_ok || start_plain_redis
    [ "${TITAN_REDIS_HA:-0}" = 1 ] || [ -f "$SENTINELS_FILE" ] && start_redis_ha
    wait_for redis_ok 20 || die "Redis did not start; see $RUN_DIR/redis.log"
    remote_env
    return
  fi
  start_plain_redis
}

# The address other hosts (and, under HA, the Sentinels) reach the data nodes at.
node_addr() { local b="${TITAN_REDIS_BIND:-127.0.0.1}"; echo "${b%% *}"; }
ha() { [ "${TITAN_REDIS_HA:-0}" = 1 ] || [ -f "$SENTINELS_FILE" ]; }

# HA: every process here reaches the primary over TCP, TLS: rediss:// (an older plain
# redis:// URL keeps its password). Not HA: the socket here, TLS for other hosts only.
ha_url() {
  ha || return 0
  if [[ "$REDIS_URL" != rediss://* ]]; then
    local secret; secret="$(redis_secret "$REDIS_URL")"; [ -n "$secret" ] || secret="$(new_secret)"
    REDIS_URL="rediss://default:${secret}@$(node_addr):$(redis_port)/0"
    (umask 077 && echo "$REDIS_URL" >"$REDIS_URL_FILE")
  fi
  tls_env manager
}

# The CA, the certificate of this host's Redis nodes (every address they listen on) and
# the local clients' certificates: made once, the server's again when an address is new.
tls_certs() {
  local hosts=(127.0.0.1 localhost "$(hostname)") a
  for a in ${TITAN_REDIS_BIND:-}; do hosts+=("$a"); done
  "$PY" "$ROOT/titan-plugins.py" tls init "${hosts[@]/#/--host=}" >&2
}

tls_lines() {  # TLS only, client certificates required, replication and Sentinel too
  printf 'port 0\ntls-port %s\ntls-cert-file %s\ntls-key-file %s\ntls-ca-cert-file %s\n' \
    "$1" "$TLS_DIR/servers/redis.crt" "$TLS_DIR/servers/redis.key" "$TLS_DIR/trust.crt"
  printf 'tls-auth-clients yes\ntls-replication yes\n'
}

# What a worker host needs besides its certificate (make worker-cert puts both in its bundle).
remote_env() {
  [ -n "${TITAN_REDIS_BIND:-}" ] || { rm -f "$REMOTE_ENV_FILE"; return; }
  local secret; secret="$(redis_secret "$REDIS_URL")"
  { echo "TITAN_REDIS_URL=rediss://default:${secret}@$(node_addr):$(redis_port)/0"
    if ha; then
      echo "TITAN_REDIS_SENTINELS=$(node_addr):26379,$(node_addr):26380,$(node_addr):26381"
      echo "TITAN_REDIS_MIN_REPLICAS=${TITAN_REDIS_MIN_REPLICAS:-1}"
    fi; } >"$REMOTE_ENV_FILE"
}

# The mode (plain, TITAN_REDIS_BIND, TITAN_REDIS_HA) decides the URL's kind; a URL in the
# environment of the other kind is named with the fix before anything starts. (A URL an
# earlier `make up` wrote in run/ follows the mode: start_plain_redis, ha_url.)
check_mode() {
  [ -n "$ENV_REDIS_URL" ] || return 0
  if redis_tls_wanted && [[ "$ENV_REDIS_URL" != rediss://* ]]; then
    die "TITAN_REDIS_URL in the environment is a plain URL ($(redis_where "$ENV_REDIS_URL")), but $( [ "${TITAN_REDIS_HA:-0}" = 1 ] && echo TITAN_REDIS_HA=1 || echo TITAN_REDIS_BIND) makes Redis speak TLS only: unset TITAN_REDIS_URL (make up keeps its own URL in $REDIS_URL_FILE)"
  fi
  if ! redis_tls_wanted && [[ "$ENV_REDIS_URL" == rediss://* ]] && ! redis_ok; then
    die "TITAN_REDIS_URL in the environment is a TLS URL ($(redis_where "$ENV_REDIS_URL")) that does not answer, and this make up starts a plain Redis on $REDIS_SOCKET (neither TITAN_REDIS_HA nor TITAN_REDIS_BIND is set): unset TITAN_REDIS_URL, or set the mode it belongs to"
  fi
}

start_plain_redis() {
  local fsync="${TITAN_REDIS_APPENDFSYNC:-everysec}" secret port=0 bind="" tls=0
  # A URL an earlier `make up` wrote in another mode (TCP on loopback, or the TLS URL of
  # an HA or TITAN_REDIS_BIND stack): the same password, on the socket now.
  if ! ha && [ -z "${TITAN_REDIS_BIND:-}" ] && [ -f "$REDIS_URL_FILE" ] &&
     [ "$(cat "$REDIS_URL_FILE")" = "$REDIS_URL" ] &&
     [[ "$REDIS_URL" == redis://*@127.0.0.1:* || "$REDIS_URL" == rediss://*@* ]]; then
    REDIS_URL="unix://default:$(redis_secret "$REDIS_URL")@$REDIS_SOCKET?db=0"
    (umask 077 && echo "$REDIS_URL" >"$REDIS_URL_FILE")
  fi
  if redis_ok; then say "Redis answers on $(redis_where "$REDIS_URL")"; return; fi
  command -v redis-server >/dev/null || die "redis-server is missing (run: make up)"
  case "$fsync" in always|everysec|no) ;; *) die "TITAN_REDIS_APPENDFSYNC must be always, everysec or no" ;; esac
  if [ -z "${TITAN_REDIS_URL:-}" ] && [[ "$REDIS_URL" != rediss://* ]]; then  # ours: a password, once
    REDIS_URL="unix://default:$(new_secret)@$REDIS_SOCKET?db=0"
    (umask 077 && echo "$REDIS_URL" >"$REDIS_URL_FILE")
  fi
  secret="$(redis_secret "$REDIS_URL")"
  # TCP only where it is asked for, and then TLS only: a private address for worker hosts
  # (docs/architecture.md: Add worker hosts), and HA's nodes. The socket for this host.
  if redis_tls_wanted; then port="$(redis_port)"; bind="127.0.0.1 ${TITAN_REDIS_BIND:-}"; tls=1
  elif [[ "$REDIS_URL" == redis://* ]]; then  # a loopback URL the environment gave
    local hp="${REDIS_URL#*://}"; hp="${hp##*@}"; hp="${hp%%/*}"
    port="${hp##*:}"; bind="127.0.0.1"; fi
  say "starting Redis on the socket $REDIS_SOCKET${bind:+ and port $port on ${bind% }}$([ $tls = 1 ] && echo ' (TLS only)'), AOF appendfsync $fsync (log: $RUN_DIR/redis.log)"
  mkdir -p "$RUN_DIR/redis"
  { if [ $tls = 1 ]; then tls_lines "$port"; else printf 'port %s\n' "$port"; fi
    [ -n "$bind" ] && printf 'bind %s\n' "$bind"
    printf 'unixsocket %s\nunixsocketperm 700\n' "$REDIS_SOCKET"
    printf 'daemonize yes\npidfile %s\nlogfile %s\ndir %s\n' \
      "$RUN_DIR/redis.pid" "$RUN_DIR/redis.log" "$RUN_DIR/redis"
    printf 'appendonly yes\nappendfsync %s\nsave ""\n' "$fsync"
    # masterauth: so that, under Sentinel, a demoted primary can follow the new one
    [ -n "$secret" ] && printf 'requirepass %s\nmasterauth %s\n' "$secret" "$secret"
  } >"$RUN_DIR/redis.conf"
  chmod 600 "$RUN_DIR/redis.conf"
  redis-server "$RUN_DIR/redis.conf" >/dev/null
  wait_for redis_ok 20 || die "Redis did not start; see $RUN_DIR/redis.log"
}

# TITAN_REDIS_HA=1: a primary, two replicas and three Sentinels (quorum 2), TLS between
# all of them, one generated password, pid files, logs and data in the run directory.
# Every process finds the primary through the Sentinels (run/redis.sentinels) and waits
# for one replica to confirm what it acknowledges (TITAN_REDIS_MIN_REPLICAS=1). Two
# replicas: after losing any one data node, a primary and a replica to confirm its writes
# remain, with nobody restarting anything.
start_redis_ha() {
  local port secret i addr
  command -v redis-server >/dev/null || die "redis-server is missing (run: make up)"
  port="$(redis_port)"; secret="$(redis_secret "$REDIS_URL")"; addr="$(node_addr)"
  for i in 1 2; do
    local name="redis-replica$i"
    pid_alive "$RUN_DIR/$name.pid" && continue
    mkdir -p "$RUN_DIR/$name"
    { tls_lines "$((port + i))"
      printf 'bind 127.0.0.1 %s\ndaemonize yes\npidfile %s\nlogfile %s\ndir %s\n' \
        "${TITAN_REDIS_BIND:-}" "$RUN_DIR/$name.pid" "$RUN_DIR/$name.log" "$RUN_DIR/$name"
      printf 'appendonly yes\nappendfsync %s\nsave ""\nrequirepass %s\nmasterauth %s\n' \
        "${TITAN_REDIS_APPENDFSYNC:-everysec}" "$secret" "$secret"
      printf 'replica-announce-ip %s\nreplicaof %s %s\n' "$addr" "$addr" "$port"
    } >"$RUN_DIR/$name.conf"
    redis-server "$RUN_DIR/$name.conf" >/dev/null
  done
  local sentinels=()
  for i in 0 1 2; do
    local sp=$((26379 + i)) name="sentinel$i"
    sentinels+=("$addr:$sp")
    pid_alive "$RUN_DIR/$name.pid" && continue
    { tls_lines "$sp"
      printf 'bind 127.0.0.1 %s\ndaemonize yes\npidfile %s\nlogfile %s\ndir %s\n' \
        "${TITAN_REDIS_BIND:-}" "$RUN_DIR/$name.pid" "$RUN_DIR/$name.log" "$RUN_DIR"
      printf 'sentinel announce-ip %s\n' "$addr"
      printf 'requirepass %s\nsentinel monitor titan %s %s 2\n' "$secret" "$addr" "$port"
      printf 'sentinel auth-pass titan %s\nsentinel down-after-milliseconds titan 2000\n' "$secret"
      printf 'sentinel failover-timeout titan 10000\n'
    } >"$RUN_DIR/$name.conf"  # Sentinel rewrites its own file: it stays in run/, 0600
    redis-server "$RUN_DIR/$name.conf" --sentinel >/dev/null
  done
  (IFS=,; echo "${sentinels[*]}") >"$SENTINELS_FILE"
  export TITAN_REDIS_SENTINELS="$(cat "$SENTINELS_FILE")"
  # HA from the moment make up returns: a failover needs every Sentinel to know both
  # replicas (learnt from the primary's INFO, every 10 s) and its two peers.
  for i in 0 1 2; do
    wait_for "[ \"\$(sentinel_knows $((26379 + i)) replicas slave)\" = 2 ] && [ \"\$(sentinel_knows $((26379 + i)) sentinels sentinel)\" = 2 ]" 60 ||
      die "the Sentinel on :$((26379 + i)) does not know both replicas and both other Sentinels; see $RUN_DIR/sentinel$i.log"
  done
  say "Redis HA (TLS): data nodes $addr:$port, :$((port + 1)), :$((port + 2)) (the Sentinels ${sentinels[*]} know which is the primary)"
}

sentinel_knows() {  # how many healthy `replicas` or `sentinels` ($2) the Sentinel at port
  # $1 lists: entries whose flags are exactly $3 (slave, sentinel: nothing down)
  REDISCLI_AUTH="$(redis_secret "$REDIS_URL")" redis-cli --no-auth-warning --tls \
    --cacert "$TLS_DIR/trust.crt" --cert "$TLS_DIR/clients/manager.crt" \
    --key "$TLS_DIR/clients/manager.key" -h 127.0.0.1 -p "$1" sentinel "$2" titan 2>/dev/null |
    awk -v want="$3" 'prev == "flags" && $0 == want { n++ } { prev = $0 } END { print n + 0 }'
}

stop_pidfile() {
  local name="$1" file="$RUN_DIR/$1.pid"
  if pid_alive "$file"; then
    say "stopping $name"
    kill "$(cat "$file")"
    wait_for "! kill -0 $(cat "$file")" 30 || kill -9 "$(cat "$file")" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Each plugin container runs as a host uid of its own (workers/identity.py): the leases
# live in one host-wide directory, root's alone, on a tmpfs (empty again after a reboot).
uid_leases() { mkdir -p "${TITAN_UID_DIR:-/run/titan/uids}"; chmod 700 "${TITAN_UID_DIR:-/run/titan/uids}"; }
# The egress proxy's own account (a system uid; no home, no shell), and the host-wide
# directory its state lies under, which it may pass through (and list nothing in).
proxy_account() {
  local user="${TITAN_EGRESS_USER:-titan-proxy}"
  id "$user" >/dev/null 2>&1 ||
    useradd --system --no-create-home --user-group --shell /usr/sbin/nologin "$user"
  mkdir -p /run/titan; chmod 711 /run/titan
}

case "${1:-start}" in
  start) check_mode; start_docker; register_gvisor; uid_leases; proxy_account; start_proxy; start_redis ;;
  docker) start_docker; register_gvisor; uid_leases; proxy_account ;;
  proxy) start_proxy ;;
  redis) check_mode; start_redis ;;
  stop)
    for s in sentinel0 sentinel1 sentinel2 redis-replica redis-replica1 redis-replica2 redis; do stop_pidfile "$s"; done
    rm -f "$SENTINELS_FILE" "$REMOTE_ENV_FILE"
    [ -x "$PY" ] && docker_ok && "$PY" -m manager.egress.proxy stop || true
    stop_pidfile dockerd ;;
  *) die "usage: $0 start|docker|redis|proxy|stop" ;;
esac
