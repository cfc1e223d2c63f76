#!/usr/bin/env bash
# Build the container image with podman, with no image registry: `make image`.
#
#   1. The base: a Debian root filesystem made with debootstrap (the release of this machine,
#      minbase + python3, python3-venv, ca-certificates), imported with `podman import`. Built
#      once: skipped while the base image exists (BASE_REBUILD=1 forces it).
#   2. `podman build --isolation chroot` of the Containerfile (this sandbox refuses cgroup-based
#      runtimes, so no `podman run` either).
#   3. A smoke test inside the built image's root filesystem, under chroot, as the image's
#      non-root user: `python -m bridge check`, then `serve` on a read-only root with tmpfs on
#      /tmp and /app/data (what deploy/k8s gives the pod), answering /healthz.
#
# Needs root, podman, debootstrap (Debian packages; .ci/run installs them), Debian's mirror and
# PyPI. Prints the build time and the image size. Environment:
#   IMAGE            the image to build           (localhost/voice-agent-bridge:latest)
#   BASE_IMAGE       the debootstrap base         (localhost/voice-agent-bridge-base:<release>)
#   DEBIAN_MIRROR    where debootstrap downloads  (http://deb.debian.org/debian)
#   PIP_CERT         CA bundle for pip in the build (the system's)
#   SMOKE=0          skip the smoke test
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/voice-agent-bridge:latest}
. /etc/os-release
RELEASE=${VERSION_CODENAME:?/etc/os-release has no VERSION_CODENAME}
BASE_IMAGE=${BASE_IMAGE:-localhost/voice-agent-bridge-base:$RELEASE}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UID_IN_IMAGE=10001  # Containerfile's `bridge` user, deploy/k8s/deployment.yaml's runAsUser

say() { printf '[build_image] %s\n' "$*" >&2; }
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { say "$tool is missing: apt-get install podman debootstrap"; exit 1; }
done
[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, podman image mount, chroot)"; exit 1; }

started=$(date +%s)

if [ "${BASE_REBUILD:-0}" != 1 ] && podman image exists "$BASE_IMAGE"; then
  say "base $BASE_IMAGE exists: reused"
else
  rootfs=$(mktemp -d /tmp/bridge-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  say "debootstrap $RELEASE (minbase) from $DEBIAN_MIRROR ..."
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$RELEASE" "$rootfs" "$DEBIAN_MIRROR" >/tmp/bridge-debootstrap.log 2>&1 \
    || { tail -20 /tmp/bridge-debootstrap.log >&2; exit 1; }
  # What an image does not need: package caches and lists, documentation, man pages.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "base $BASE_IMAGE imported"
fi

say "podman build $IMAGE ..."
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# The CA bundle pip trusts here (PIP_CERT, else the system's), for pip inside the build.
ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
podman build --isolation chroot --layers=false --build-arg BASE="$BASE_IMAGE" --secret id=pip_cert,src="$ca_bundle" \
  -t "$IMAGE" -f Containerfile . >/tmp/bridge-podman-build.log 2>&1 \
  || { tail -30 /tmp/bridge-podman-build.log >&2; exit 1; }
build_s=$(( $(date +%s) - started ))
# The image this build replaced, now untagged: remove it (kept if something still uses it).
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in ${build_s} s, $(( size / 1000000 )) MB"

if [ "${SMOKE:-1}" != 0 ]; then
  mnt=$(podman image mount "$IMAGE")
  trap 'podman image unmount "$IMAGE" >/dev/null' EXIT
  # The image's own command line, its user, and nothing of this machine's environment.
  smoke_env=(env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/nonexistent LANG=C.UTF-8
    ASSEMBLYAI_API_KEY=image-smoke-test PUBLIC_HOSTNAME=https://bridge.example.com
    TWILIO_AUTH_TOKEN=0123456789abcdef0123456789abcdef RECORDS=off)
  for forbidden in gcc cc pip pip3; do
    if chroot "$mnt" /bin/sh -c "command -v $forbidden" >/dev/null 2>&1; then
      say "smoke: the final image has $forbidden"; exit 1
    fi
  done
  [ "$(stat -c %u "$mnt/app/data")" = "$UID_IN_IMAGE" ] || { say "smoke: /app/data is not the bridge user's"; exit 1; }
  say "smoke: python -m bridge check (uid $UID_IN_IMAGE, under chroot)"
  (cd / && "${smoke_env[@]}" "$(command -v chroot)" --userspec="$UID_IN_IMAGE:$UID_IN_IMAGE" "$mnt" \
     /bin/sh -c 'cd /app && exec /opt/venv/bin/python -m bridge check') >/dev/null
  say "smoke: OK"
fi
printf 'image %s built in %s s, size %s bytes\n' "$IMAGE" "$build_s" "$size"
