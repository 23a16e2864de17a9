#!/usr/bin/env bash
# up|down|build the compose deployment (compose.yaml). Builds every image locally when no
# registry answers (never pulling, never using an upstream name for a local image):
#   titan-base:bookworm        Debian + python3 + venv + redis-server + squid (debootstrap)
#   titan-plugin-manager:local the services, from wheels built here (`pip wheel`)
#   titan-runtime:py3.11       what plugins run in (as make up builds it)
# Settings (environment): TITAN_COMPOSE_PROJECT (titan), TITAN_WORKERS (3), TITAN_API_PORT,
# TITAN_METRICS_PORT, TITAN_FLOWER_PORT, TITAN_MANAGER_NAME, TITAN_WORKERS_DIR, and the
# images' and the env file's names (TITAN_BASE_IMAGE, TITAN_SERVICE_IMAGE,
# TITAN_COMPOSE_ENV_FILE), which the tests set to their own.
source "$(dirname "$0")/common.sh"
cd "$ROOT"

PROJECT="${TITAN_COMPOSE_PROJECT:-titan}"
WORKERS="${TITAN_WORKERS:-3}"
ENV_FILE="${TITAN_COMPOSE_ENV_FILE:-$ROOT/.env}"  # the Redis password lives here (0600)
export TITAN_BASE_IMAGE="${TITAN_BASE_IMAGE:-titan-base:bookworm}"
export TITAN_SERVICE_IMAGE="${TITAN_SERVICE_IMAGE:-titan-plugin-manager:local}"
STAMP="build/.service-stamp-${TITAN_SERVICE_IMAGE//[:\/]/_}"
export TITAN_INSTANCE="compose-$PROJECT"
export TITAN_WORKERS_DIR="${TITAN_WORKERS_DIR:-/var/lib/titan/workers}"
export TITAN_WORKERS_HOME="$TITAN_WORKERS_DIR/$PROJECT"  # removed by down
# The project's CA and certificates (Redis speaks TLS only, client certificates required).
COMPOSE_RUN="${TITAN_COMPOSE_RUN_DIR:-$RUN_DIR/compose-$PROJECT}"
export TITAN_TLS_DIR="$COMPOSE_RUN/tls"
export TITAN_SECRETS_HOST_DIR="$COMPOSE_RUN/secrets"
# Egress (profile egress, when TITAN_EGRESS_ALLOW is set): the proxy's directory and
# network (host-wide, named by the instance); plugin secrets' files on a tmpfs of the
# project's own.
export TITAN_EGRESS_DIR="/run/titan/egress/$TITAN_INSTANCE"
export TITAN_EGRESS_NETWORK="titan-egress-$TITAN_INSTANCE"
export TITAN_SECRET_FILES_DIR="/run/titan/secrets-$TITAN_INSTANCE"
export TITAN_PROXY_ACCOUNTS="$COMPOSE_RUN/proxy"
export TITAN_EGRESS_HOSTS_FILE="${TITAN_EGRESS_HOSTS:-$COMPOSE_RUN/proxy/hosts}"
# The network's bridge, named so the firewall rule can name it before it exists.
export TITAN_BRIDGE="tt$(printf '%s' "$PROJECT" | sha256sum | cut -c1-11)"
FIREWALL_TAG="titan-compose:$PROJECT"
API="http://127.0.0.1:${TITAN_API_PORT:-8003}"

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p "$PROJECT" --env-file "$ENV_FILE" "$@"
  else docker-compose -p "$PROJECT" --env-file "$ENV_FILE" "$@"; fi
}

need_compose() {
  docker compose version >/dev/null 2>&1 && return
  command -v docker-compose >/dev/null && return
  [ "$(id -u)" = 0 ] || die "neither 'docker compose' nor docker-compose is installed"
  say "installing docker-compose"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
}

build() {
  # The base needs Debian's pip (plugin requirements are installed with the system's
  # Python as an unprivileged user: TITAN_INSTALL_SANDBOX=user) and Squid (the egress
  # proxy's service). An older base lacks them.
  if docker image inspect "$TITAN_BASE_IMAGE" >/dev/null 2>&1 &&
     ! docker run --rm --network none "$TITAN_BASE_IMAGE" sh -c \
       'python3 -m pip --version && command -v squid' >/dev/null 2>&1; then
    docker rmi -f "$TITAN_BASE_IMAGE" "$TITAN_SERVICE_IMAGE" >/dev/null 2>&1 || true
  fi
  bash "$ROOT/scripts/image.sh"  # first: the base is built on it
  bash "$ROOT/scripts/image.sh" "$TITAN_BASE_IMAGE" \
    "python3,python3-venv,python3-pip,python-is-python3,redis-server,squid,procps,ca-certificates"
  mkdir -p build/wheels build/plugin-wheels
  if ! docker image inspect "$TITAN_SERVICE_IMAGE" >/dev/null 2>&1 ||
     [ "$(cat "$STAMP" 2>/dev/null)" != "$(service_stamp)" ]; then
    say "building the project's wheels (pip wheel)"
    # (build/lib is setuptools' copy of the tree: a module deleted since would ride along)
    rm -rf build/lib build/bdist.* build/wheels/titan_plugin_manager-*.whl
    # async-timeout: redis-py needs it on the image's Python (Debian's 3.11.2), not here
    "$PY" -m pip wheel -q --disable-pip-version-check -w build/wheels ".[flower]" \
      "async-timeout>=4.0.3" 2>&1 |
      grep -v -E "^\s*$|WARNING: Location" >&2 || true
    say "building $TITAN_SERVICE_IMAGE"
    # --force-rm: a step that fails (or a build cut short) leaves no container behind
    docker build --force-rm -f deploy/Dockerfile --build-arg "BASE=$TITAN_BASE_IMAGE" \
      -t "$TITAN_SERVICE_IMAGE" . 2>&1 |
      grep --line-buffered -E "^(Step|Successfully|ERROR|The command)" >&2 || true
    docker image inspect "$TITAN_SERVICE_IMAGE" >/dev/null || die "the service image did not build"
    service_stamp >"$STAMP"
  else
    say "image $TITAN_SERVICE_IMAGE is up to date"
  fi
  say "wheels for the plugins' requirements (containers reach no package index)"
  # (the services' Redis settings are theirs, not this host tool's)
  env -u TITAN_REDIS_SENTINELS -u TITAN_REDIS_MIN_REPLICAS \
    "$PY" -m manager.plugins.deps "${TITAN_PLUGINS_HOST_DIR:-$ROOT/plugins}" build/plugin-wheels >&2
}

service_stamp() {  # what the service image is made of
  { cat setup.cfg pyproject.toml celeryconfig.py deploy/Dockerfile
    find manager workers -name '*.py' -o -name '*.c' | sort | xargs cat; } | sha256sum | cut -c1-16
}

secrets() {  # generated once into .env (0600): Redis password, API key, Flower's login
  local name value
  for name in TITAN_REDIS_PASSWORD TITAN_API_TOKEN TITAN_FLOWER_AUTH TITAN_PLUGIN_SECRETS_KEY; do
    grep -qs "^$name=" "$ENV_FILE" && continue
    case "$name" in
      TITAN_FLOWER_AUTH) value="titan:$(new_secret)" ;;
      # a Fernet key (manager/core/secrets.py): 32 random bytes, urlsafe base64
      TITAN_PLUGIN_SECRETS_KEY) value="$(head -c 32 /dev/urandom | base64 | tr '+/' '-_')" ;;
      *) value="$(new_secret)" ;;
    esac
    (umask 077 && printf '%s=%s\n' "$name" "$value" >>"$ENV_FILE")
  done
  chmod 600 "$ENV_FILE"
}

env_value() { sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1; }

# The services' uids (Redis and its Sentinels, Flower): picked once per
# project into the env file from 1900000-1999999, each one no host account or group has
# and no process runs as (the run uids are 2000000 and up, the install uid 64999).
service_uids() {
  local name uid
  for name in TITAN_REDIS_UID TITAN_FLOWER_UID TITAN_PROXY_UID; do
    if ! grep -qs "^$name=" "$ENV_FILE"; then
      while :; do
        uid=$((1900000 + $(od -An -N4 -tu4 /dev/urandom) % 100000))
        getent passwd "$uid" >/dev/null || getent group "$uid" >/dev/null && continue
        ps -eo uid=,gid= | grep -qw "$uid" && continue
        grep -qs "=$uid\$" "$ENV_FILE" && continue
        break
      done
      printf '%s=%s\n' "$name" "$uid" >>"$ENV_FILE"
    fi
    export "$name=$(env_value "$name")"
  done
}

# One file per secret and reader, 0400 and owned by the uid that reads it; a service is
# given only its own (compose.yaml `secrets:`). Keys of the TLS certificates likewise.
secret_files() {
  local dir="$TITAN_SECRETS_HOST_DIR" pw url reader
  pw="$(env_value TITAN_REDIS_PASSWORD)"
  url="rediss://default:$pw@redis:6379/0"
  rm -rf "$dir"
  (umask 077; mkdir -p "$dir"/{redis,manager,workers,flower}
   printf '%s' "$pw" >"$dir/redis/redis_password"
   for reader in manager workers flower; do printf '%s' "$url" >"$dir/$reader/titan_redis_url"; done
   printf '%s' "$(env_value TITAN_API_TOKEN)" >"$dir/manager/titan_api_token"
   for reader in manager workers; do
     printf '%s\n' "$(env_value TITAN_PLUGIN_SECRETS_KEY)" >"$dir/$reader/plugin_secrets_key"
   done
   printf 'basic_auth = [%s]\n' "\"$(env_value TITAN_FLOWER_AUTH)\"" >"$dir/flower/flowerconfig.py")
  chown -R "$TITAN_REDIS_UID:$TITAN_REDIS_UID" "$dir/redis"
  chown -R "$TITAN_FLOWER_UID:$TITAN_FLOWER_UID" "$dir/flower"
  find "$dir" -type f -exec chmod 400 {} +
  # certificates are public (their directory stays root's); each key is its reader's
  chmod 644 "$TITAN_TLS_DIR"/*.crt "$TITAN_TLS_DIR"/servers/*.crt "$TITAN_TLS_DIR"/clients/*.crt
  chown root:root "$TITAN_TLS_DIR"/clients/*.key
  chown "$TITAN_REDIS_UID:$TITAN_REDIS_UID" "$TITAN_TLS_DIR/servers/redis.key"
  chown "$TITAN_FLOWER_UID:$TITAN_FLOWER_UID" "$TITAN_TLS_DIR/clients/flower.key"
  chmod 400 "$TITAN_TLS_DIR"/servers/redis.key "$TITAN_TLS_DIR"/clients/*.key
}

# The project's bridge answers root only (root's docker-proxy delivers the ports
# published on 127.0.0.1): no other host account reaches a service at its container
# address. The rule names the bridge, so it holds before the network exists; `down`
# removes it.
firewall() {
  local rule=(OUTPUT -o "$TITAN_BRIDGE" -m owner ! --uid-owner 0
              -m comment --comment "$FIREWALL_TAG" -j REJECT)
  case "$1" in
    on) iptables -C "${rule[@]}" 2>/dev/null || iptables -I "${rule[@]}" ;;
    off) while iptables -D "${rule[@]}" 2>/dev/null; do :; done ;;
  esac
}

# The CA, one server certificate naming every Redis node and Sentinel (their service
# names, which they announce), a client certificate per service, and the TLS lines of
# every node's configuration.
certificates() {
  local hosts=(redis redis-replica redis-replica2 sentinel sentinel2 sentinel3 localhost 127.0.0.1)
  (umask 077; mkdir -p "$COMPOSE_RUN")
  TITAN_RUN_DIR="$COMPOSE_RUN" "$PY" "$ROOT/titan-plugins.py" tls init "${hosts[@]/#/--host=}" >&2
  printf '%s\n' 'port 0' 'tls-port 6379' 'tls-cert-file /run/titan/tls/server.crt' \
    'tls-key-file /run/titan/tls/server.key' 'tls-ca-cert-file /run/titan/tls/ca.crt' \
    'tls-auth-clients yes' 'tls-replication yes' >"$TITAN_TLS_DIR/node.conf"
}

# The proxy's account inside its container (a uid no host account has), the host tmpfs
# of the runs' secret files, and, with a ceiling, the proxy's image and what it serves
# on: its network, firewall rules, directory and squid.conf (manager/egress/proxy.py).
egress() {
  (umask 077; mkdir -p "$TITAN_PROXY_ACCOUNTS")
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\ntitan-proxy:x:%s:%s::/nonexistent:/usr/sbin/nologin\n' \
    "$TITAN_PROXY_UID" "$TITAN_PROXY_UID" >"$TITAN_PROXY_ACCOUNTS/passwd"
  printf 'root:x:0:\ntitan-proxy:x:%s:\n' "$TITAN_PROXY_UID" >"$TITAN_PROXY_ACCOUNTS/group"
  [ -n "${TITAN_EGRESS_HOSTS:-}" ] || : >"$TITAN_PROXY_ACCOUNTS/hosts"
  chmod 644 "$TITAN_PROXY_ACCOUNTS"/*
  mkdir -p "$TITAN_SECRET_FILES_DIR" "$TITAN_EGRESS_DIR"
  grep -qs " $TITAN_SECRET_FILES_DIR tmpfs " /proc/self/mounts ||
    mount -t tmpfs -o size=16m,mode=0711,nosuid,nodev,noexec titan-secrets "$TITAN_SECRET_FILES_DIR"
  [ -n "${TITAN_EGRESS_ALLOW:-}" ] || return 0
  export COMPOSE_PROFILES="${COMPOSE_PROFILES:+$COMPOSE_PROFILES,}egress"
  "$PY" -m manager.egress.proxy prepare "$TITAN_PROXY_UID" "$TITAN_PROXY_UID" /opt/titan/egress >&2
}

up() {
  if [ "${TITAN_REDIS_HA:-0}" = 1 ]; then  # profile ha: two replicas and three Sentinels
    export COMPOSE_PROFILES=ha TITAN_REDIS_MIN_REPLICAS="${TITAN_REDIS_MIN_REPLICAS:-1}"
    export TITAN_REDIS_SENTINELS="sentinel:26379,sentinel2:26379,sentinel3:26379"
  fi
  bash "$ROOT/scripts/services.sh" docker
  need_compose
  build
  secrets
  service_uids
  certificates
  secret_files
  firewall on
  egress
  mkdir -p "$TITAN_WORKERS_HOME" /srv/titan/files
  say "starting the compose project '$PROJECT' with $WORKERS workers"
  compose up -d --scale "worker=$WORKERS"
  wait_for "curl -fsS $API/health | grep -q '\"count\":$WORKERS'" 120 ||
    { curl -sS "$API/health" >&2; die "not healthy; see: docker-compose -p $PROJECT logs"; }
  if [ "${TITAN_REDIS_HA:-0}" = 1 ]; then  # a failover needs every Sentinel to know them
    local sentinel
    for sentinel in sentinel sentinel2 sentinel3; do
      wait_for "[ \"\$(sentinel_replicas $sentinel)\" = 2 ]" 60 ||
        die "$sentinel does not see both replicas; see: docker-compose -p $PROJECT logs"
    done
  fi
  say "Titan Plugin Manager (compose) is up: API $API, metrics :${TITAN_METRICS_PORT:-8004}, Flower :${TITAN_FLOWER_PORT:-5555}"
}

sentinel_replicas() {  # how many replicas Sentinel service $1 knows
  compose exec -T "$1" sh -c 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli \
    --tls --cacert /run/titan/tls/ca.crt --cert /run/titan/tls/server.crt \
    --key /run/titan/tls/server.key -p 26379 sentinel replicas titan' | grep -c '^flags$'
}

down() {
  need_compose
  [ -f "$ENV_FILE" ] || secrets  # compose refuses the file without the password variable
  service_uids
  COMPOSE_PROFILES=ha,egress compose down --volumes --remove-orphans  # every profile's
  firewall off
  "$PY" -m manager.egress.proxy teardown >&2
  while umount "$TITAN_SECRET_FILES_DIR" 2>/dev/null; do :; done
  rm -rf "$TITAN_EGRESS_DIR" "$TITAN_SECRET_FILES_DIR"
  rm -rf "$COMPOSE_RUN"  # its CA goes with its data: the next up makes a new one
  # What the workers started on the host's engine is not part of the project.
  local left
  left="$(docker ps -aq --filter "label=titan.instance=$TITAN_INSTANCE")"
  [ -z "$left" ] || docker rm -f $left >/dev/null
  rm -rf "$TITAN_WORKERS_HOME"  # every worker's cache, the killed ones' too
  say "compose project '$PROJECT' is down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  build) bash "$ROOT/scripts/services.sh" docker; build ;;
  *) die "usage: $0 up|down|build" ;;
esac
