#!/usr/bin/env bash
# start|stop the Docker engine and Redis. Starts only what does not already answer, and
# records what it started (pid files in the run directory) so `stop` stops exactly that.
source "$(dirname "$0")/common.sh"
mkdir -p "$RUN_DIR"

start_docker() {
  if docker_ok; then say "Docker engine answers"; return; fi
  command -v dockerd >/dev/null || die "dockerd is missing (run: make up)"
  say "starting a Docker engine (log: $RUN_DIR/dockerd.log)"
  nohup dockerd >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/dockerd.pid"
  wait_for docker_ok 60 || die "the Docker engine did not start; see $RUN_DIR/dockerd.log"
}

start_redis() {
  if redis_ok; then say "Redis answers on port $(redis_port)"; return; fi
  command -v redis-server >/dev/null || die "redis-server is missing (run: make up)"
  say "starting Redis on 127.0.0.1:$(redis_port) (log: $RUN_DIR/redis.log)"
  mkdir -p "$RUN_DIR/redis"
  redis-server --port "$(redis_port)" --bind 127.0.0.1 --daemonize yes \
    --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --dir "$RUN_DIR/redis" \
    --appendonly yes --appendfsync everysec --save "" >/dev/null
  wait_for redis_ok 20 || die "Redis did not start; see $RUN_DIR/redis.log"
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

case "${1:-start}" in
  start) start_docker; start_redis ;;
  docker) start_docker ;;
  redis) start_redis ;;
  stop) stop_pidfile redis; stop_pidfile dockerd ;;
  *) die "usage: $0 start|docker|redis|stop" ;;
esac
