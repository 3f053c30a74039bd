#!/bin/bash
# Build every QEMU version of the registry (testbed/qemu/versions.py) from its
# Debian source: patched with its series (patches/<series>/), and, for a
# version whose stock oracle is not Debian's installed binary, once more
# without the series from the very same source.  Each build is cached under
# ${TESTBED_CACHE:-~/.cache/testbed}/qemu/<key>/ and linked at
# build/qemu/<version>/<kind>/ (bin/ inside).
#
# The key hashes the version, the kind, the source version, the patches, the
# configure line, the meson requirement and this script, so a second run with
# nothing changed only re-links.  A build happens in a temporary directory
# renamed into place only when complete: an interrupted build never looks like
# a cache hit.
usage() {
  cat <<'EOF'
usage: scripts/build-qemu.sh [--fetch-only | --print-key | --list] [VERSION...]

Builds QEMU (qemu-system-x86_64, qemu-img, qemu-io, qemu-nbd,
qemu-storage-daemon; open-hook-server for patched builds) for each VERSION
(default: $QEMU_VERSIONS, commas or spaces, or else every registered version).

  --fetch-only  only download and unpack the sources (for reading them)
  --print-key   print "VERSION KIND KEY" for the current inputs and exit
  --list        print the registered versions and exit

Environment: TESTBED_CACHE (the cache), QEMU_VERSIONS, QEMU_BUILD_JOBS
(ninja -j, default 2), CCACHE_DIR (ccache is used when installed).
EOF
}
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${TESTBED_CACHE:-$HOME/.cache/testbed}
registry=$repo/testbed/qemu/versions.py
mode=build
selection=()
for arg in "$@"; do
  case "$arg" in
    --fetch-only) mode=fetch ;;
    --print-key) mode=key ;;
    --list) mode=list ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) selection+=("$arg") ;;
  esac
done

say() { echo "build-qemu: $*" >&2; }
die() { say "error: $*"; exit 1; }

# The registry is Python (one source of truth for the build and the testbed);
# run as a script it needs only the standard library.
registry() { PYTHONPATH=$repo python3 "$registry" "$@"; }

if [ "$mode" = list ]; then
  registry names
  exit 0
fi
versions=$(registry names "${selection[*]:-${QEMU_VERSIONS:-}}") || exit 1

common_configure=(
  --target-list=x86_64-softmmu --without-default-features
  --enable-kvm --enable-tcg --enable-vdi --enable-vvfat --enable-qcow1 --enable-fdt=system
  --enable-tools --disable-docs --disable-install-blobs
)
script_hash=$(sha256sum < "${BASH_SOURCE[0]}" | cut -d' ' -f1)

# The system's own release (bookworm here): its deb entries are the model for
# every suite's deb-src entries.
system_suite() {
  local c
  c=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$c" ] || die "cannot tell the system's Debian release from /etc/os-release"
  echo "$c"
}

# deb-src lines for suite $2 from the system's deb entries for suite $1
# (one-line and deb822 formats): same mirrors, same components, same keys,
# the suite renamed (bookworm-security -> trixie-security).  /etc/apt is only
# read.
private_sources() {
  local from=$1 to=$2 f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v from="$from" -v to="$to" '$1 == "deb" {
           i = 2;
           if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
           s = $(i+1);
           if (index(s, from) == 1) { $1 = "deb-src"; $(i+1) = to substr(s, length(from) + 1); print }
         }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v from="$from" -v to="$to" 'function flush() {
           if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "")
             { n = split(uris, u, " "); m = split(suites, s, " ");
               for (a = 1; a <= n; a++) for (b = 1; b <= m; b++)
                 if (index(s[b], from) == 1) {
                   opt = signed != "" ? "[signed-by=" signed "] " : "";
                   print "deb-src " opt u[a] " " to substr(s[b], length(from) + 1) " " comps } }
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

# apt-get with a private sources list and state for one suite
apt_private() {
  local suite=$1 apt_dir=$cache/apt/$1
  shift
  apt-get -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-" \
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" \
    -o "APT::Sandbox::User=root" "$@"
}

fetch_source() {
  local label=$1 suite=$2 version=$3 dest=$4 apt_dir=$cache/apt/$2
  if [ -f "$dest/.complete" ]; then
    return 0
  fi
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  private_sources "$(system_suite)" "$suite" | sort -u > "$apt_dir/sources.list"
  [ -s "$apt_dir/sources.list" ] ||
    die "$label: no $(system_suite) 'deb' entries in /etc/apt to derive $suite deb-src from"
  say "$label: private apt sources ($apt_dir/sources.list):"
  sed 's/^/  /' "$apt_dir/sources.list" >&2
  say "$label: apt-get update (private state in $apt_dir)"
  apt_private "$suite" -qq update || die "$label: apt-get update for $suite failed"
  local tmp tree
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
  say "$label: apt-get source qemu=$version into $tmp"
  (cd "$tmp" && apt_private "$suite" -q source "qemu=$version") >&2 ||
    die "$label: apt-get source qemu=$version ($suite) failed"
  tree=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n1)
  [ -n "$tree" ] || die "$label: apt-get source left no qemu-* directory in $tmp"
  rm -rf "$dest"
  mv "$tree" "$dest"
  rm -rf "$tmp"
  touch "$dest/.complete"
  say "$label: source unpacked (Debian patches applied) in $dest"
}

# A venv holding meson $1 (a pip requirement), made once per requirement.
meson_env() {
  local spec=$1 dir
  dir=$cache/meson/$(printf '%s' "$spec" | tr -c 'A-Za-z0-9.=_-' '_')
  if [ ! -f "$dir/.complete" ]; then
    say "pip install $spec into $dir (the build's own environment)"
    rm -rf "$dir"
    python3 -m venv "$dir" >&2 || die "python3 -m venv $dir failed"
    "$dir/bin/pip" install -q "$spec" >&2 || die "pip install $spec into $dir failed"
    touch "$dir/.complete"
  fi
  echo "$dir"
}

series_patches() {
  local series=$repo/patches/$1/series
  [ -f "$series" ] || die "no $series"
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$series" | grep -v '^$' || true
}

# --- per version -------------------------------------------------------------
# load VERSION: the registry entry as QV_* variables, the source version
# resolved, the source directory named
load() {
  local v=$1
  eval "$(registry shell "$v")" || die "$v: not in the registry $registry"
  if [ -z "$QV_SOURCE_VERSION" ]; then
    QV_SOURCE_VERSION=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
    [ -n "$QV_SOURCE_VERSION" ] ||
      die "$v: qemu-system-x86 is not installed (scripts/deps.sh installs it)"
  fi
  srcdir=$cache/qemu-src/${QV_SOURCE_VERSION//:/_}
}

kinds() {
  echo patched
  [ "$QV_BUILD_STOCK" = 1 ] && echo stock
  return 0
}

cache_key() {
  local kind=$1 p
  {
    echo "qemu $QV_NAME $kind"
    echo "source $QV_SUITE $QV_SOURCE_VERSION"
    echo "configure ${common_configure[*]} ${QV_CONFIGURE_EXTRA[*]}"
    echo "meson ${QV_MESON:-system}"
    echo "script $script_hash"
    if [ "$kind" = patched ]; then
      for p in $(series_patches "$QV_SERIES"); do
        [ -f "$repo/patches/$QV_SERIES/$p" ] ||
          die "$QV_NAME: patches/$QV_SERIES/series names $p, which does not exist"
        echo "patch $p $(sha256sum < "$repo/patches/$QV_SERIES/$p" | cut -d' ' -f1)"
      done
    fi
  } | sha256sum | cut -c1-16
}

programs() {
  echo qemu-system-x86_64 "${QV_TOOLS[@]}"
  [ "$1" = patched ] && echo open-hook-server
  return 0
}

is_built() {
  local dir=$1 kind=$2 p
  for p in $(programs "$kind"); do
    [ -x "$dir/bin/$p" ] || return 1
  done
}

link_build() {
  local v=$1 kind=$2 final=$3 root=$repo/build/qemu
  # build/qemu was one symlink to one build before versions existed
  [ -L "$root" ] && rm -f "$root"
  mkdir -p "$root/$v"
  ln -sfn "$final" "$root/$v/$kind"
  say "$v $kind: build/qemu/$v/$kind -> $final"
  if [ "$v" = 7.2 ] && [ "$kind" = patched ]; then
    # old paths (build/qemu/bin/...) keep naming the default version's patched build
    ln -sfn "7.2/patched/bin" "$root/bin"
  fi
}

build_one() {
  local v=$1 kind=$2 key=$3 final=$4 label="$1 $2"
  local tmp log start meson_dir
  tmp=$(mktemp -d "$cache/qemu/.build-$key.XXXXXX")
  log=$tmp/out/build.log
  mkdir -p "$tmp/out/bin"
  failed() {
    cp "$log" "$cache/qemu/failed-$v-$kind.log" 2>/dev/null || true
    die "$label: $1 (log: $cache/qemu/failed-$v-$kind.log)"
  }
  say "$label: building QEMU $QV_SOURCE_VERSION ($QV_SUITE), key $key"
  say "$label: log $log (moves to $final/build.log when done)"
  start=$(date +%s)

  cp -a "$srcdir" "$tmp/src"
  rm -f "$tmp/src/.complete"
  if [ "$kind" = patched ]; then
    local p
    for p in $(series_patches "$QV_SERIES"); do
      say "$label: applying patches/$QV_SERIES/$p"
      patch -d "$tmp/src" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch \
        < "$repo/patches/$QV_SERIES/$p" >> "$log" 2>&1 || failed "patch $p does not apply"
    done
  fi

  # Debian's +dfsg tarball has no edk2 blobs; 7.2's meson still lists them
  # when bzip2 exists.  Empty, valid .bz2 placeholders satisfy it; with
  # --disable-install-blobs nothing is installed from them.
  local f
  for f in $(grep -o "'edk2-[a-z0-9_-]*\.fd'" "$tmp/src/pc-bios/meson.build" | tr -d "'"); do
    [ -e "$tmp/src/pc-bios/$f.bz2" ] || bzip2 -c < /dev/null > "$tmp/src/pc-bios/$f.bz2"
  done

  local extra=()
  if [ -n "$QV_MESON" ]; then
    meson_dir=$(meson_env "$QV_MESON")
    extra+=(--python="$meson_dir/bin/python3")
  fi
  # ccache, when installed, makes rebuilds quick (the stock and patched
  # builds of one source share almost every object).  QEMU's configure hands
  # meson an explicit compiler, so it must be named here; it is not part of
  # the key (it does not change the output).  The temporary directory's name
  # must not enter ccache's hash.
  if command -v ccache > /dev/null; then
    extra+=(--cc="ccache cc")
    export CCACHE_BASEDIR=$tmp CCACHE_NOHASHDIR=true
  fi
  mkdir -p "$tmp/src/build"
  say "$label: configure ${common_configure[*]} ${QV_CONFIGURE_EXTRA[*]} ${extra[*]}"
  (cd "$tmp/src/build" &&
    ../configure "${common_configure[@]}" "${QV_CONFIGURE_EXTRA[@]}" "${extra[@]}") \
    >> "$log" 2>&1 || failed "configure failed"

  local targets=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon)
  [ "$kind" = patched ] && targets+=(contrib/open-hook-server/open-hook-server)
  local jobs=${QEMU_BUILD_JOBS:-2}
  say "$label: ninja -j$jobs ${targets[*]} (every 100th step below, full output in the log)"
  (cd "$tmp/src/build" && ninja -j"$jobs" "${targets[@]}" 2>&1) | tee -a "$log" |
    awk -v label="$label" '
      /^\[[0-9]+\/[0-9]+\]/ { split(substr($1, 2), a, "/"); n = a[1] + 0; m = a[2] + 0
                              if (n % 100 == 0 || n == m) { printf "  [%s] step %d of %d\n", label, n, m; fflush() }
                              next }
      /error:|FAILED|fatal/ { print "  [" label "] " $0; fflush() }' >&2 || failed "ninja failed"

  local t
  for t in "${targets[@]}"; do
    cp "$tmp/src/build/$t" "$tmp/out/bin/" || failed "ninja did not produce $t"
  done
  local version_string
  version_string=$("$tmp/out/bin/qemu-system-x86_64" --version | head -n1) ||
    failed "the new qemu-system-x86_64 does not run"
  echo "$version_string" >> "$log"
  local patches_json=""
  [ "$kind" = patched ] && patches_json=$(series_patches "$QV_SERIES" | sed 's/.*/"&"/' | paste -sd,)
  cat > "$tmp/out/info.json" <<JSON
{"key": "$key", "version": "$v", "kind": "$kind", "source_version": "$QV_SOURCE_VERSION",
 "suite": "$QV_SUITE", "series": "$([ "$kind" = patched ] && echo "$QV_SERIES")",
 "patches": [$patches_json],
 "configure": "${common_configure[*]} ${QV_CONFIGURE_EXTRA[*]}", "meson": "${QV_MESON:-system}",
 "version_string": "$version_string",
 "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "seconds": $(($(date +%s) - start))}
JSON
  # The rename is what makes the entry exist: an interrupted build leaves only
  # a .build-* directory, removed by the next run.
  rm -rf "$final"
  mv "$tmp/out" "$final"
  rm -rf "$tmp"
  rm -f "$cache/qemu/failed-$v-$kind.log"
  say "$label: done in $(($(date +%s) - start))s"
}

# --- main ------------------------------------------------------------------------
if [ "$mode" = fetch ]; then
  "$repo/scripts/deps.sh" build
  for v in $versions; do
    load "$v"
    fetch_source "$v" "$QV_SUITE" "$QV_SOURCE_VERSION" "$srcdir"
    echo "$v $srcdir"
  done
  exit 0
fi

if [ "$mode" = key ]; then
  for v in $versions; do
    load "$v"
    for kind in $(kinds); do
      echo "$v $kind $(cache_key "$kind")"
    done
  done
  exit 0
fi

total_start=$(date +%s)
locked=0
for v in $versions; do
  load "$v"
  for kind in $(kinds); do
    key=$(cache_key "$kind")
    final=$cache/qemu/$key
    if is_built "$final" "$kind"; then
      say "$v $kind: cached build $key is up to date"
      link_build "$v" "$kind" "$final"
      continue
    fi
    if [ "$locked" = 0 ]; then
      "$repo/scripts/deps.sh" build
      mkdir -p "$cache/qemu"
      exec 9> "$cache/qemu/.lock"
      say "waiting for $cache/qemu/.lock (another build may hold it)"
      flock -w 3600 9 || die "another build holds $cache/qemu/.lock for over an hour"
      # leftovers of interrupted builds (we hold the lock, so none is running)
      rm -rf "$cache/qemu"/.build-*
      locked=1
    fi
    if is_built "$final" "$kind"; then  # built by whoever held the lock
      say "$v $kind: cached build $key is up to date"
    else
      fetch_source "$v" "$QV_SUITE" "$QV_SOURCE_VERSION" "$srcdir"
      build_one "$v" "$kind" "$key" "$final"
    fi
    link_build "$v" "$kind" "$final"
  done
done
say "all done in $(($(date +%s) - total_start))s: $(echo $versions)"
