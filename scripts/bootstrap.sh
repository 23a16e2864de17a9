#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian/Ubuntu machine: system packages that
# are missing, and a virtualenv with this package (and its test tools) from setup.cfg.
source "$(dirname "$0")/common.sh"

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v redis-server >/dev/null || need+=(redis-server)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
# The install sandbox: pip runs as an unprivileged uid under bubblewrap, with the
# system's Python and pip (manager/plugins/installer.py).
command -v bwrap >/dev/null || need+=(bubblewrap)
# gVisor's runsc, for plugins with `isolation: gvisor` (registered by services.sh).
command -v runsc >/dev/null || need+=(runsc)
# POSIX ACLs on files plugins may read (docs/security.md; the tests grant and deny them).
command -v setfacl >/dev/null || need+=(acl)
# The egress proxy (manager/egress): Debian's Squid, run by services.sh as its own uid;
# installed without starting the distribution's service (which would listen on :3128).
command -v squid >/dev/null || need+=(squid)
# A C compiler and static libc: the prewarm launcher (workers/launcher.c) is built here.
command -v gcc >/dev/null || need+=(gcc)
compgen -G "/usr/lib/*/libc.a" >/dev/null || need+=(libc6-dev)
# libfaketime: the tests run workers on skewed clocks (tests/test_clocks.py).
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || need+=(libfaketime)
# Chromium, for the console's browser tests (`make test` asks: Playwright drives Debian's
# browser; nothing is downloaded from a browser vendor).
if [ "${1:-}" = tests ]; then command -v chromium >/dev/null || need+=(chromium); fi
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing system packages: ${need[*]} (install them as root)"
  say "installing system packages: ${need[*]}"
  apt-get update -qq
  no_start=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # no service starts from a package's install
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; no_start=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ $no_start = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now squid >/dev/null 2>&1 || true  # ours is started by make up
  fi
fi

stamp="$VENV/.titan-installed"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$PY" ]; then
  say "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing titan-plugin-manager into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
  "$PY" -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e "$ROOT[dev]"
  echo "$want" >"$stamp"
fi

# The launcher every prewarmed container runs as PID 1 (mounted read-only from here):
# static, so that it needs nothing of the image it runs in.
LAUNCHER="$ROOT/workers/titan-launcher"
if [ ! -x "$LAUNCHER" ] || [ "$ROOT/workers/launcher.c" -nt "$LAUNCHER" ]; then
  say "building the prewarm launcher (workers/launcher.c)"
  gcc -static -Os -s -Wall -Wextra -Werror -o "$LAUNCHER.tmp" "$ROOT/workers/launcher.c"
  mv -f "$LAUNCHER.tmp" "$LAUNCHER"
fi
