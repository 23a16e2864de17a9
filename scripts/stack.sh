#!/usr/bin/env bash
# start|stop|status the manager (API, bus listener, metrics) and the Celery workers, in
# the background, with logs and pid files in the run directory.
source "$(dirname "$0")/common.sh"
private_run_dir
WORKERS="${TITAN_WORKERS:-2}"
CONCURRENCY="${TITAN_WORKER_CONCURRENCY:-1}"
export PROMETHEUS_MULTIPROC_DIR="$RUN_DIR/metrics"
export TITAN_REDIS_URL="$REDIS_URL"
API="http://${TITAN_API_HOST:-127.0.0.1}:${TITAN_API_PORT:-8003}"
CURL=(curl -fsS)
# TITAN_API_TLS=1: HTTPS on the API's port with a certificate of the project's CA, which
# curl and the CLI check (run/tls/trust.crt).
if [ "${TITAN_API_TLS:-0}" = 1 ]; then
  API="https://${TITAN_API_HOST:-127.0.0.1}:${TITAN_API_PORT:-8003}"
  CURL=(curl -fsS --cacert "$TLS_DIR/trust.crt")
fi

launch() {  # name, command...
  local name="$1"; shift
  if pid_alive "$RUN_DIR/$name.pid"; then say "$name is running (pid $(cat "$RUN_DIR/$name.pid"))"; return; fi
  (cd "$ROOT"; nohup "$@" >>"$RUN_DIR/$name.log" 2>&1 </dev/null & echo $! >"$RUN_DIR/$name.pid")
  say "started $name (pid $(cat "$RUN_DIR/$name.pid"), log $RUN_DIR/$name.log)"
}

start() {
  [ -x "$PY" ] || die "no virtualenv; run: make up"
  redis_ok || die "Redis does not answer on $(redis_where "$REDIS_URL") (or refuses the password in $REDIS_URL_FILE); run: make up"
  mkdir -p "$RUN_DIR" "$PROMETHEUS_MULTIPROC_DIR"
  # The API's key: generated once (run/api.token, 0600; the CLI reads it there), unless
  # the environment brings one. Rotate: delete the file, then make plugins-down plugins-up.
  if [ -z "${TITAN_API_TOKEN:-}" ]; then
    [ -s "$API_TOKEN_FILE" ] || new_secret >"$API_TOKEN_FILE"
    TITAN_API_TOKEN="$(cat "$API_TOKEN_FILE")"
  fi
  export TITAN_API_TOKEN
  local any_running=0 i
  for f in "$RUN_DIR"/manager.pid "$RUN_DIR"/worker*.pid; do pid_alive "$f" && any_running=1; done
  [ $any_running = 1 ] || rm -f "$PROMETHEUS_MULTIPROC_DIR"/*.db
  if [ "${TITAN_API_TLS:-0}" = 1 ]; then
    local hosts=(127.0.0.1 localhost "$(hostname)" "${TITAN_API_HOST:-127.0.0.1}")
    "$PY" "$ROOT/titan-plugins.py" tls init "${hosts[@]/#/--api-host=}" >&2
  fi
  tls_env manager  # each process its own client certificate (Redis over TLS only)
  launch manager "$PY" -m manager ${TITAN_WATCH:+--watch}
  # Flower, behind basic auth on every page and its API; the credentials are generated
  # once into run/flower.auth (0600) and reach Flower through its environment, never a
  # command line (which every local user can read).
  [ -s "$FLOWER_AUTH_FILE" ] || printf 'titan:%s\n' "$(new_secret)" >"$FLOWER_AUTH_FILE"
  tls_env flower
  # Its port is the front's (manager.api.flower: deadlines, a cap per local account);
  # Flower itself listens on a socket in the root-only run directory.
  FLOWER_BASIC_AUTH="$(cat "$FLOWER_AUTH_FILE")" launch flower "$PY" -m manager.api.flower \
    --address=127.0.0.1 --port="${TITAN_FLOWER_PORT:-5555}" --socket="$RUN_DIR/flower.sock"
  tls_env workers
  for ((i = 1; i <= WORKERS; i++)); do
    launch "worker$i" "$VENV/bin/celery" -A workers.celery_app worker -Q "${TITAN_TASK_QUEUE:-titan.plugins}" \
      -n "worker$i@%h" -c "$CONCURRENCY" -P prefork --loglevel INFO --without-gossip --without-mingle
  done
  wait_for "${CURL[*]} $API/openapi.json" 30 || die "the API did not come up; see $RUN_DIR/manager.log"
  wait_for "${CURL[*]} $API/health" 40 || { "${CURL[@]}" "$API/health" >&2; die "not healthy; see $RUN_DIR/*.log"; }
  say "Titan Plugin Manager is up: API $API (docs $API/docs), metrics :${TITAN_METRICS_PORT:-8004}/metrics, Flower http://127.0.0.1:${TITAN_FLOWER_PORT:-5555} (user:password in $FLOWER_AUTH_FILE)"
}

stop() {
  local f name
  for f in "$RUN_DIR"/flower.pid "$RUN_DIR"/worker*.pid "$RUN_DIR"/manager.pid; do
    [ -f "$f" ] || continue
    name="$(basename "$f" .pid)"
    if pid_alive "$f"; then
      say "stopping $name (runs in flight finish first)"
      kill -TERM "$(cat "$f")"
      wait_for "! kill -0 $(cat "$f")" 90 || { say "$name did not stop; killing it"; kill -9 "$(cat "$f")" || true; }
    fi
    rm -f "$f"
  done
}

status() {
  local f
  for f in "$RUN_DIR"/manager.pid "$RUN_DIR"/worker*.pid "$RUN_DIR"/flower.pid; do
    [ -f "$f" ] || continue
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
