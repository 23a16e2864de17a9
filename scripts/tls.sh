#!/usr/bin/env bash
# Rotation without losing an event (docs/architecture.md, Rotation): each step changes the
# files in run/tls or the password, has every running Redis node and Sentinel load them
# (CONFIG SET to the same path reloads TLS files; ACL SETUSER adds or removes a password),
# then restarts the manager, Flower and the workers here (a warm stop: runs in flight
# finish; events and queued runs wait in Redis). Worker hosts get a new bundle between
# the two steps of a CA or password rotation.
#   rotate-ca      a new CA trusted beside the old; the clients here reissued under it
#   retire-ca      the servers reissued under the new CA; the old one no longer trusted
#   rotate-server  the Redis server certificate reissued (same CA, same addresses)
#   redis-rotate-password   a second password beside the first; everything here uses it
#   redis-retire-password   the first password removed
source "$(dirname "$0")/common.sh"
private_run_dir
CLI=("$PY" "$ROOT/titan-plugins.py")
[[ "$REDIS_URL" == rediss://* ]] || [ -s "$REMOTE_ENV_FILE" ] ||
  die "Redis listens on this host only (no TLS, no worker hosts): nothing to rotate"
tls_env manager

nodes() {  # "port" of each TLS node started here that is alive
  local n
  for n in redis redis-replica1 redis-replica2 sentinel0 sentinel1 sentinel2; do
    pid_alive "$RUN_DIR/$n.pid" && sed -n 's/^tls-port //p' "$RUN_DIR/$n.conf"
  done
}

node_cli() {  # port, args...: as the manager's client, with the current password
  local port="$1"; shift
  REDISCLI_AUTH="$(redis_secret "$(cat "$REDIS_URL_FILE")")" redis-cli --no-auth-warning \
    --tls --cacert "$TLS_DIR/trust.crt" --cert "$TLS_DIR/clients/manager.crt" \
    --key "$TLS_DIR/clients/manager.key" -h 127.0.0.1 -p "$port" "$@"
}

reload_tls() {
  local port
  for port in $(nodes); do
    node_cli "$port" config set tls-ca-cert-file "$TLS_DIR/trust.crt" >/dev/null
    node_cli "$port" config set tls-cert-file "$TLS_DIR/servers/redis.crt" \
      tls-key-file "$TLS_DIR/servers/redis.key" >/dev/null
  done
  say "Redis nodes on ports $(nodes | xargs) loaded run/tls"
}

restart_here() {
  [ -f "$RUN_DIR/manager.pid" ] || return 0
  bash "$ROOT/scripts/stack.sh" stop && bash "$ROOT/scripts/stack.sh" start
}

set_password() {  # every node: ACL op on the default user, masterauth / auth-pass
  local op="$1" pw="$2" port
  for port in $(nodes); do
    node_cli "$port" acl setuser default "$op$pw" >/dev/null
    if [ "$op" = ">" ]; then
      if node_cli "$port" info server | grep -q '^redis_mode:sentinel'; then
        node_cli "$port" sentinel set titan auth-pass "$pw" >/dev/null
      else node_cli "$port" config set masterauth "$pw" >/dev/null; fi
    fi
  done
}

case "${1:-}" in
  rotate-ca)  # nodes trust both CAs before any certificate of the new one is shown
    "${CLI[@]}" tls rotate-ca; reload_tls
    for c in manager flower workers; do "${CLI[@]}" tls issue "$c" >/dev/null; done
    restart_here
    say "next: a new bundle for each worker host (make -s worker-cert NAME=...), then make tls-retire-ca" ;;
  retire-ca)  # servers under the new CA (everyone trusts it now), then the old CA goes
    "${CLI[@]}" tls issue redis >/dev/null; reload_tls
    "${CLI[@]}" tls retire-ca; reload_tls; restart_here ;;
  rotate-server)
    "${CLI[@]}" tls issue redis >/dev/null; reload_tls ;;
  redis-rotate-password)
    old="$(redis_secret "$(cat "$REDIS_URL_FILE")")"; new="$(new_secret)"
    set_password ">" "$new"
    (umask 077; echo "$old" >"$RUN_DIR/redis.password.old"
     sed "s/$old/$new/" "$REDIS_URL_FILE" >"$REDIS_URL_FILE.new" && mv "$REDIS_URL_FILE.new" "$REDIS_URL_FILE"
     [ ! -f "$REMOTE_ENV_FILE" ] || sed -i "s/$old/$new/" "$REMOTE_ENV_FILE")
    export TITAN_REDIS_URL="$(cat "$REDIS_URL_FILE")"; REDIS_URL="$TITAN_REDIS_URL"
    restart_here
    say "next: the new titan.env on each worker host (make -s worker-cert NAME=...), then make redis-retire-password" ;;
  redis-retire-password)
    [ -s "$RUN_DIR/redis.password.old" ] || die "no password to retire (make redis-rotate-password first)"
    set_password "<" "$(cat "$RUN_DIR/redis.password.old")"; rm -f "$RUN_DIR/redis.password.old"
    say "the previous Redis password is no longer accepted" ;;
  *) die "usage: $0 rotate-ca|retire-ca|rotate-server|redis-rotate-password|redis-retire-password" ;;
esac
