#!/bin/bash
# Build the testbed guest: Debian's cloud kernel (unpacked, never installed)
# and an initramfs with static busybox, the virtio and vfat modules and
# testbed/guest/init.sh as /init.
#
# Cached under ${TESTBED_CACHE:-~/.cache/testbed}/guest/<hash>/, keyed by
# the kernel package and version, busybox's version and the content of this
# script and the guest scripts; built in a temp dir and renamed at the end.
# build/guest in the repository is a symlink to the cached directory.
#
# Output: vmlinuz, initrd.img, modules.load (the load order), info.json.
# Usage: scripts/build-guest.sh [--force]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${TESTBED_CACHE:-$HOME/.cache/testbed}/guest
meta=linux-image-cloud-amd64
busybox=/bin/busybox
guest_src=$repo/testbed/guest
# The modules the guest needs (virtio_pci is the transport: nothing depends
# on it, so it must be named); their dependencies are added from depends=.
# nls_ascii: vfat's default iocharset here; cp437: its default codepage.
wanted=(virtio_pci virtio_blk vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859-1)

die() { echo "build-guest: $*" >&2; exit 1; }
say() { echo "build-guest: $*"; }

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) die "usage: $0 [--force]" ;;
esac

for tool in apt-get apt-cache dpkg-deb cpio gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/deps.sh guest)"
done
[ -x "$busybox" ] || die "$busybox not found (install busybox-static)"
# ldd fails on a static binary; a dynamic busybox would not run in the initramfs.
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked (install busybox-static, not busybox)"
fi
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
if [ -z "$(candidate "$meta")" ] || [ "$(candidate "$meta")" = "(none)" ]; then
  say "no candidate for $meta: apt-get update"
  apt-get update -qq || die "apt-get update failed"
fi
# The metapackage depends on the versioned kernel package that holds the files.
pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$pkg" ] || die "cannot resolve the kernel package behind $meta"
version=$(candidate "$pkg")
{ [ -n "$version" ] && [ "$version" != "(none)" ]; } || die "no candidate version of $pkg"

key=$( {
  echo "$pkg $version"
  "$busybox" 2>&1 | head -n 1
  cat "$0" "$guest_src/init.sh" "$guest_src/tb.sh"
} | sha256sum | cut -c1-16)
out=$cache/$key

link() {
  mkdir -p "$repo/build"
  ln -sfn "$out" "$repo/build/guest"
}

if [ "$force" = 0 ] && [ -f "$out/info.json" ]; then
  link
  say "cached: $out ($pkg $version)"
  exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "downloading $pkg $version"
(cd "$tmp" && apt-get download -q "$pkg=$version" 2>&1 | grep -v "unsandboxed as root" || true)
deb=$(ls "$tmp"/*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || die "apt-get download $pkg=$version produced no .deb"
dpkg-deb -x "$deb" "$tmp/pkg"
kver=$(ls "$tmp/pkg/lib/modules")
[ -f "$tmp/pkg/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $deb"
moddir=$tmp/pkg/lib/modules/$kver

# Find a module's file, decompressing .ko.xz/.ko.zst into plain .ko because
# busybox insmod may not read compressed modules.
declare -A modfile=()
find_module() {
  local name=$1 glob f
  # Module names treat - and _ alike (nls_iso8859-1.ko is nls_iso8859_1).
  glob=${name//_/[-_]}
  f=$(find "$moddir/kernel" -name "$glob.ko*" -print -quit)
  [ -n "$f" ] || return 1
  mkdir -p "$tmp/mods"
  case "$f" in
    *.ko) cp "$f" "$tmp/mods/$name.ko" ;;
    *.ko.xz) xz -dc "$f" >"$tmp/mods/$name.ko" ;;
    *.ko.zst) command -v zstd >/dev/null || die "$f is zstd-compressed and zstd is missing"
              zstd -qdc "$f" >"$tmp/mods/$name.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$tmp/mods/$name.ko" ;;
    *) die "unknown module file $f" ;;
  esac
  modfile[$name]=$tmp/mods/$name.ko
}

is_builtin() {
  grep -qE "/${1//_/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null
}

# Depth-first over depends=, so each module comes after what it needs.
order=()
declare -A state=()
visit() {
  local name=$1 deps dep
  case "${state[$name]:-}" in
    done) return ;;
    active) die "module dependency cycle through $name" ;;
  esac
  state[$name]=active
  if find_module "$name"; then
    deps=$(tr '\0' '\n' <"${modfile[$name]}" | sed -n 's/^depends=//p' | head -n 1)
    for dep in ${deps//,/ }; do
      visit "${dep//-/_}"
    done
    order+=("$name")
  elif is_builtin "$name"; then
    say "$name is built into the kernel"
  else
    die "module $name not found in $pkg"
  fi
  state[$name]=done
}
for m in "${wanted[@]}"; do
  visit "${m//-/_}"
done
say "module load order: ${order[*]}"

root=$tmp/initramfs
mkdir -p "$root"/{bin,dev,etc,lib/modules,mnt,proc,sys,tmp}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$guest_src/init.sh" "$root/init"
install -m 0755 "$guest_src/tb.sh" "$root/bin/tb"
for m in "${order[@]}"; do
  cp "${modfile[$m]}" "$root/lib/modules/$m.ko"
done
printf '%s\n' "${order[@]}" >"$root/etc/modules.load"

stage=$tmp/out
mkdir -p "$stage"
cp "$tmp/pkg/boot/vmlinuz-$kver" "$stage/vmlinuz"
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
   cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$stage/initrd.img"
printf '%s\n' "${order[@]}" >"$stage/modules.load"
cat >"$stage/info.json" <<JSON
{"package": "$pkg", "version": "$version", "kernel": "$kver", "key": "$key",
 "modules": [$(printf '"%s",' "${order[@]}" | sed 's/,$//')]}
JSON

rm -rf "$out"
mv "$stage" "$out"
link
say "built $out ($pkg $version, kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1))"
