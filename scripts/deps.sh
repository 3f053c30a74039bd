#!/bin/bash
# Install the Debian packages the testbed needs, only those missing.
# Usage: scripts/deps.sh [runtime|build|guest|all]
set -euo pipefail
want=(qemu-system-x86 qemu-utils strace busybox-static cpio python3-venv util-linux)
case "${1:-all}" in
  runtime) ;;
  build|all) want+=(ninja-build meson libglib2.0-dev libpixman-1-dev libfdt-dev pkg-config
                    flex bison dpkg-dev gcc make python3-venv ccache) ;;
  guest) want+=(dpkg-dev) ;;
  *) echo "usage: $0 [runtime|build|guest|all]" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "deps.sh: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
  exit 1
fi
echo "deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
