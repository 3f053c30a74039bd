#!/bin/bash
# Install the Debian packages the testbed needs, only those missing.
# Usage: scripts/deps.sh [runtime|build|guest|libvirt|all]
set -euo pipefail
want=(qemu-system-x86 qemu-utils strace busybox-static cpio python3-venv util-linux)
# libvirt (docs/libvirt.md): the sysv flavour, so that installing it does not
# pull in systemd; installed without recommends (no dnsmasq, no AppArmor).
libvirt=(libvirt-daemon-system libvirt-daemon-system-sysv libvirt-daemon-driver-qemu libvirt-clients)
lean=()
build=(ninja-build meson libglib2.0-dev libpixman-1-dev libfdt-dev pkg-config
       flex bison dpkg-dev gcc make python3-venv ccache)
case "${1:-all}" in
  runtime) ;;
  build) want+=("${build[@]}") ;;
  all) want+=("${build[@]}"); lean+=("${libvirt[@]}") ;;
  guest) want+=(dpkg-dev) ;;
  libvirt) lean+=("${libvirt[@]}") ;;
  *) echo "usage: $0 [runtime|build|guest|libvirt|all]" >&2; exit 2 ;;
esac
absent() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
  done
}
mapfile -t missing < <(absent "${want[@]}")
mapfile -t missing_lean < <(absent ${lean[@]+"${lean[@]}"})
if ((${#missing[@]} + ${#missing_lean[@]} == 0)); then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "deps.sh: missing Debian packages: ${missing[*]} ${missing_lean[*]} (run as root or install them)" >&2
  exit 1
fi
echo "deps.sh: installing ${missing[*]} ${missing_lean[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ((${#missing[@]})); then
  apt-get install -y -qq "${missing[@]}"
fi
if ((${#missing_lean[@]})); then
  apt-get install -y -qq --no-install-recommends "${missing_lean[@]}"
fi
