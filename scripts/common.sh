# Shared settings and helpers for the project's shell scripts (sourced, not run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${TITAN_RUN_DIR:-$ROOT/run}"
VENV="${TITAN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
RUNTIME_IMAGE="${TITAN_RUNTIME_IMAGE:-titan-runtime:py3.11}"
# The Redis URL: the environment's, else the one `make up` wrote (with the password it
# generated), else the default.
REDIS_URL_FILE="$RUN_DIR/redis.url"
# make's copy of the file is not the environment's own: the file is read fresh below.
if [ "${TITAN_REDIS_URL_FROM_RUN:-}" = 1 ]; then unset TITAN_REDIS_URL TITAN_REDIS_URL_FROM_RUN; fi
ENV_REDIS_URL="${TITAN_REDIS_URL:-}"  # the environment's own, if any (services.sh check_mode)
if [ -z "${TITAN_REDIS_URL:-}" ] && [ -f "$REDIS_URL_FILE" ]; then
  TITAN_REDIS_URL="$(cat "$REDIS_URL_FILE")"
fi
# Redis on this host listens on a unix socket in the run directory (0700, root's): no
# other local account can open it, fill its client slots, or stand in for it and collect
# the password. TCP only for worker hosts (TITAN_REDIS_BIND) and for Redis HA.
REDIS_SOCKET="$RUN_DIR/redis.sock"
REDIS_URL="${TITAN_REDIS_URL:-unix://$REDIS_SOCKET?db=0}"
# Redis HA (TITAN_REDIS_HA=1 make up): the Sentinels every process asks for the primary.
SENTINELS_FILE="$RUN_DIR/redis.sentinels"
if [ -z "${TITAN_REDIS_SENTINELS:-}" ] && [ -f "$SENTINELS_FILE" ]; then
  export TITAN_REDIS_SENTINELS="$(cat "$SENTINELS_FILE")"
  export TITAN_REDIS_MIN_REPLICAS="${TITAN_REDIS_MIN_REPLICAS:-1}"
fi
export TITAN_RUN_DIR="$RUN_DIR"
# Redis beyond this host (TITAN_REDIS_BIND, HA) speaks TLS only, with client certificates
# from the project's CA in run/tls/ (manager/core/certs.py). Processes here present
# their own certificate (set per process by stack.sh; the manager's for the CLI tools).
TLS_DIR="$RUN_DIR/tls"
REMOTE_ENV_FILE="$RUN_DIR/redis.remote.env"  # what a worker host needs (make worker-cert)
redis_tls_wanted() { [ "${TITAN_REDIS_HA:-0}" = 1 ] || [ -f "$SENTINELS_FILE" ] || [ -n "${TITAN_REDIS_BIND:-}" ]; }
tls_env() {  # exports the TLS settings of client NAME when the URL is rediss://
  [[ "$REDIS_URL" == rediss://* ]] || return 0
  export TITAN_REDIS_TLS_CA="$TLS_DIR/trust.crt" TITAN_REDIS_TLS_CERT="$TLS_DIR/clients/$1.crt" \
    TITAN_REDIS_TLS_KEY="$TLS_DIR/clients/$1.key"
}
API_TOKEN_FILE="$RUN_DIR/api.token"
FLOWER_AUTH_FILE="$RUN_DIR/flower.auth"

# The run directory holds the Redis password, the API token, every stored event (the
# AOF), logs and metrics: it and everything the services started from here create are
# root's alone (umask 077; also what an older version left is made so). The cache is
# private by its own 0700 directory; the files in it that plugin containers read keep the
# modes the workers gave them, so it is left as it is.
private_run_dir() {
  umask 077
  mkdir -p "$RUN_DIR"
  chmod 700 "$RUN_DIR"
  find "$RUN_DIR" -mindepth 1 -path "${TITAN_CACHE_DIR:-$RUN_DIR/cache}" -prune \
    -o -exec chmod go-rwx {} +
}

# A secret of 24 random bytes, as hex.
new_secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

if [ -t 2 ]; then
  say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
else  # plain text in logs and pipes
  say() { printf '==> %s\n' "$*" >&2; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True when the process whose pid is stored in FILE is alive.
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Waits up to $2 seconds for command "$1" to succeed.
wait_for() {
  local cmd="$1" secs="$2" i
  for ((i = 0; i < secs * 5; i++)); do
    eval "$cmd" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

docker_ok() { docker info >/dev/null 2>&1; }
redis_port() { echo "${TITAN_REDIS_PORT:-6379}"; }
redis_secret() {  # the password in a redis:// or unix:// URL ("" when none)
  local u="${1#*://}"
  [[ "$u" == *@* ]] || { echo ""; return; }
  u="${u%%@*}"; echo "${u#*:}"
}
redis_where() {  # what the URL names: a socket path, or host:port
  local u="${1#*://}"; u="${u##*@}"; u="${u%%\?*}"
  if [[ "$1" == unix://* ]]; then echo "the socket $u"; else echo "${u%%/*}"; fi
}
redis_cli() {  # redis-cli for $REDIS_URL (the password through the environment, never argv)
  local secret; secret="$(redis_secret "$REDIS_URL")"
  if [[ "$REDIS_URL" == unix://* ]]; then
    local path="${REDIS_URL#*://}"; path="${path##*@}"; path="${path%%\?*}"
    REDISCLI_AUTH="$secret" redis-cli --no-auth-warning -s "$path" "$@"
  else
    local hp="${REDIS_URL#*://}" tls=(); hp="${hp##*@}"; hp="${hp%%/*}"
    [[ "$REDIS_URL" == rediss://* ]] && tls=(--tls --cacert "$TLS_DIR/trust.crt"
      --cert "$TLS_DIR/clients/manager.crt" --key "$TLS_DIR/clients/manager.key")
    REDISCLI_AUTH="$secret" redis-cli --no-auth-warning "${tls[@]}" -h "${hp%:*}" -p "${hp##*:}" "$@"
  fi
}
redis_ok() { redis_cli ping 2>/dev/null | grep -q PONG; }
