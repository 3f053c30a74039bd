#!/bin/bash
# Build Debian's QEMU 7.2 with the -open-hook-fd series (patches/series) and
# cache the result under ${TESTBED_CACHE:-~/.cache/testbed}/qemu/<hash>/.
#
# The hash covers the source version, the patches, the configure line and this
# script, so a second run with nothing changed only re-links build/qemu.
# A build happens in a temporary directory that is renamed into place only
# when it is complete: an interrupted build never looks like a cache hit.
#
# Usage: scripts/build-qemu.sh [--fetch-only] [--print-key]
#   --fetch-only  only download and unpack the source (for reading it)
#   --print-key   print the cache key for the current inputs and exit
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TESTBED_CACHE:-$HOME/.cache/testbed}
patches=$repo/patches
mode=build
case "${1:-}" in
  --fetch-only) mode=fetch ;;
  --print-key) mode=key ;;
  "") ;;
  *) echo "usage: $0 [--fetch-only|--print-key]" >&2; exit 2 ;;
esac

say() { echo "build-qemu: $*" >&2; }
die() { say "error: $*"; exit 1; }

configure_args=(
  --target-list=x86_64-softmmu --without-default-features
  --enable-kvm --enable-tcg --enable-vdi --enable-vvfat --enable-qcow1 --enable-fdt=system
  --disable-docs --disable-install-blobs
)

# The source version we build is the one of the installed stock QEMU, so that
# "patched" and "stock" differ only by the series.
source_version() {
  local v
  v=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
  [ -n "$v" ] || die "qemu-system-x86 is not installed (scripts/deps.sh installs it)"
  echo "$v"
}

# deb-src lines for bookworm from the same mirror hosts as the system's apt
# sources (one-line and deb822 formats), without touching /etc/apt.
private_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {
           i = 2; opts = "";
           if ($2 ~ /^\[/) { while ($i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
           if ($(i+1) ~ /^bookworm/) { $1 = "deb-src"; print }
         }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'function flush() {
           if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "")
             { n = split(uris, u, " "); m = split(suites, s, " ");
               for (a = 1; a <= n; a++) for (b = 1; b <= m; b++)
                 if (s[b] ~ /^bookworm/) {
                   opt = signed != "" ? "[signed-by=" signed "] " : "";
                   print "deb-src " opt u[a] " " s[b] " " comps } }
           types = uris = suites = comps = signed = enabled = "" }
         /^[ \t]*#/ { next }
         /^[ \t]*$/ { flush(); next }
         { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "");
           if (key == "types") types = $0; else if (key == "uris") uris = $0;
           else if (key == "suites") suites = $0; else if (key == "components") comps = $0;
           else if (key == "signed-by") signed = $0; else if (key == "enabled") enabled = $0 }
         END { flush() }' "$f"
  done
}

fetch_source() {
  local version=$1 dest=$2 apt_dir=$cache/apt
  if [ -f "$dest/.complete" ]; then
    return 0
  fi
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  private_sources | sort -u > "$apt_dir/sources.list"
  [ -s "$apt_dir/sources.list" ] || die "no bookworm 'deb' entries found in /etc/apt to derive deb-src from"
  say "private apt sources ($apt_dir/sources.list):"
  sed 's/^/  /' "$apt_dir/sources.list" >&2
  local apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Sandbox::User=root"
  )
  say "apt-get update (private state in $apt_dir)"
  apt-get "${apt_opts[@]}" -qq update
  local tmp
  tmp=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
  say "apt-get source qemu=$version into $tmp"
  (cd "$tmp" && apt-get "${apt_opts[@]}" -q source "qemu=$version") >&2 ||
    die "apt-get source qemu=$version failed"
  local tree
  tree=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)
  [ -n "$tree" ] || die "apt-get source left no qemu-* directory in $tmp"
  rm -rf "$dest"
  mv "$tree" "$dest"
  rm -rf "$tmp"
  touch "$dest/.complete"
  say "source unpacked (Debian patches applied) in $dest"
}

version=$(source_version)
srcdir=$cache/qemu-src/${version//:/_}
mkdir -p "$cache/qemu-src"

if [ "$mode" = fetch ]; then
  "$repo/scripts/deps.sh" build
  fetch_source "$version" "$srcdir"
  echo "$srcdir"
  exit 0
fi

# --- the cache key -----------------------------------------------------------
series_patches() {
  [ -f "$patches/series" ] || die "no $patches/series"
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$patches/series" | grep -v '^$' || true
}

cache_key() {
  {
    echo "version $version"
    echo "configure ${configure_args[*]}"
    echo "script $(sha256sum < "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
    local p
    for p in $(series_patches); do
      [ -f "$patches/$p" ] || die "patches/series names $p, which does not exist"
      echo "patch $p $(sha256sum < "$patches/$p" | cut -d' ' -f1)"
    done
  } | sha256sum | cut -c1-16
}

key=$(cache_key)
if [ "$mode" = key ]; then
  echo "$key"
  exit 0
fi

final=$cache/qemu/$key
link_build() {
  mkdir -p "$repo/build"
  ln -sfn "$final" "$repo/build/qemu"
  say "build/qemu -> $final"
  say "  $repo/build/qemu/bin/qemu-system-x86_64"
  say "  $repo/build/qemu/bin/open-hook-server"
}

if [ -x "$final/bin/qemu-system-x86_64" ] && [ -x "$final/bin/open-hook-server" ]; then
  say "cached build $key is up to date"
  link_build
  exit 0
fi

# --- a build -------------------------------------------------------------------
"$repo/scripts/deps.sh" build
fetch_source "$version" "$srcdir"

mkdir -p "$cache/qemu"
exec 9> "$cache/qemu/.lock"
flock -w 3600 9 || die "another build holds $cache/qemu/.lock for over an hour"
# leftovers of interrupted builds (we hold the lock, so none is running)
rm -rf "$cache/qemu"/.build-*

tmp=$(mktemp -d "$cache/qemu/.build-$key.XXXXXX")
log=$tmp/out/build.log
mkdir -p "$tmp/out/bin"
say "building QEMU $version with the series, key $key"
say "log: $log (moves to $final/build.log when done)"
start=$(date +%s)

cp -a "$srcdir" "$tmp/src"
rm -f "$tmp/src/.complete"
for p in $(series_patches); do
  say "applying $p"
  patch -d "$tmp/src" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch \
    < "$patches/$p" >> "$log" 2>&1 || die "patch $p does not apply (see $log)"
done

# Debian's +dfsg tarball has no edk2 blobs; meson still lists them when bzip2
# exists.  Empty, valid .bz2 placeholders satisfy it; with
# --disable-install-blobs nothing is installed from them.
for f in $(grep -o "'edk2-[a-z0-9_-]*\.fd'" "$tmp/src/pc-bios/meson.build" | tr -d "'"); do
  [ -e "$tmp/src/pc-bios/$f.bz2" ] || bzip2 -c < /dev/null > "$tmp/src/pc-bios/$f.bz2"
done

# ccache, when installed, makes rebuilds after a patch change quick.  QEMU's
# configure hands meson an explicit compiler, so it must be named here; it is
# not part of the cache key (it does not change the output).  The temporary
# build directory's name must not enter ccache's hash.
cc_args=()
if command -v ccache > /dev/null; then
  cc_args=(--cc="ccache cc")
  export CCACHE_BASEDIR=$tmp CCACHE_NOHASHDIR=true
fi
mkdir -p "$tmp/src/build"
say "configure ${configure_args[*]} ${cc_args[*]}"
(cd "$tmp/src/build" && ../configure "${configure_args[@]}" "${cc_args[@]}") >> "$log" 2>&1 ||
  die "configure failed (see $log)"
jobs=${QEMU_BUILD_JOBS:-2}
say "ninja -j$jobs (progress below, full output in the log)"
set -o pipefail
(cd "$tmp/src/build" &&
  ninja -j"$jobs" qemu-system-x86_64 contrib/open-hook-server/open-hook-server 2>&1) |
  tee -a "$log" | grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|error|FAILED' >&2 ||
  die "build failed (see $log)"

cp "$tmp/src/build/qemu-system-x86_64" "$tmp/out/bin/"
cp "$tmp/src/build/contrib/open-hook-server/open-hook-server" "$tmp/out/bin/"
"$tmp/out/bin/qemu-system-x86_64" --version >> "$log"
cat > "$tmp/out/info.json" <<JSON
{"key": "$key", "source_version": "$version", "configure": "${configure_args[*]}",
 "patches": [$(series_patches | sed 's/.*/"&"/' | paste -sd,)],
 "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "seconds": $(($(date +%s) - start))}
JSON
# The rename is what makes the entry exist: an interrupted build leaves only
# a .build-* directory, removed by the next run.
rm -rf "$final"
mv "$tmp/out" "$final"
rm -rf "$tmp"
say "done in $(($(date +%s) - start))s"
link_build
