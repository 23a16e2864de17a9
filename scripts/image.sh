#!/usr/bin/env bash
# Builds a local image from Debian bookworm when it is absent:
#   image.sh                  the plugin runtime image (python3), $TITAN_RUNTIME_IMAGE
#   image.sh NAME PACKAGES    any other (compose's base: python3, venv, redis-server)
# Another image is built FROM the runtime image when that is present, its packages added
# with apt (15 s, where a second debootstrap takes 70; the layers are shared). Else a
# registry that answers gives debian:bookworm-slim to build FROM; without one, debootstrap
# builds the same root filesystem and `docker import` turns it into an image.
# Local images get local names only (never an upstream name they are not).
source "$(dirname "$0")/common.sh"

NAME="${1:-$RUNTIME_IMAGE}"
PACKAGES="${2:-python3,python-is-python3,procps,ca-certificates}"
MIRROR="${TITAN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$NAME" >/dev/null 2>&1; then
  say "image $NAME is present"
  exit 0
fi

build_on() {  # FROM $1, the packages added with apt
  local out
  say "building $NAME FROM $1 (apt-get install)"
  # --force-rm: a step that fails leaves no container behind; then another way is tried
  out="$(printf 'FROM %s\nRUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends %s >/dev/null && rm -rf /var/lib/apt/lists/*\nCMD ["python3"]\n' \
    "$1" "${PACKAGES//,/ }" | docker build --force-rm -q -t "$NAME" - 2>&1)" && return
  say "that failed ($(grep -v -E '^ *$|DEPRECATED|buildx|BuildKit' <<<"$out" | tail -1)): trying another way"
  return 1
}

build_on_runtime() {
  [ "$NAME" != "$RUNTIME_IMAGE" ] && docker image inspect "$RUNTIME_IMAGE" >/dev/null 2>&1 &&
    build_on "$RUNTIME_IMAGE"
}

build_from_registry() {
  say "trying a registry for debian:bookworm-slim (20 s at most)"
  timeout 20 docker pull -q debian:bookworm-slim >/dev/null 2>&1 && build_on debian:bookworm-slim
}

build_with_debootstrap() {
  command -v debootstrap >/dev/null || die "debootstrap is missing (run: make up)"
  ROOTFS="$(mktemp -d /var/tmp/titan-rootfs.XXXXXX)"
  trap 'rm -rf "$ROOTFS"' EXIT
  local dir="$ROOTFS"
  say "no registry answered: building $NAME with debootstrap (about a minute)"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$dir" "$MIRROR" 2>&1 |
    grep --line-buffered -E '^I: (Retrieving|Extracting|Installing|Unpacking|Configuring|Base system)' |
    awk '{ if ($2 != last) { if (n) printf " %d\n", n; printf "   %s ", $2; last = $2; n = 0 }
           n++; if (n % 10 == 0) printf "."; fflush() }
         END { printf " %d\n", n }' >&2
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  say "importing the root filesystem into Docker as $NAME"
  tar -C "$dir" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$NAME" >/dev/null
}

docker_ok || die "the Docker engine does not answer (run: make up)"
if ! build_on_runtime; then
  if [ "${TITAN_IMAGE_NO_PULL:-}" = "1" ] || ! build_from_registry; then
    build_with_debootstrap
  fi
fi
docker run --rm --network none "$NAME" python3 -c 'import sys; print("python", sys.version.split()[0])' >&2
say "image $NAME is ready"
