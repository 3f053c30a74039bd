#!/bin/sh
# `tb`: the guest half of the testbed's disk checks.  The host (records.py)
# owns the layout and passes offsets as arguments; this script only reads,
# writes and reports, one line per fact, in words the host's patterns match.
#
#   tb pattern SECTORS            PATTERN <sha256 of the first SECTORS sectors>
#   tb write START FIRST COUNT RUN
#                                 record seq at sector START+seq, each written
#                                 with O_DIRECT and fsync, then SYNCED <seq>;
#                                 WRITER DONE <last> or WRITE FAILED <seq>
#   tb fat DEV FILE...            FATSUM <sha256> <FILE> for files on a vfat DEV
#   tb off                        sync and power off
set -u
cmd=${1:-}
case "$cmd" in
pattern)
    sum=$(dd if=/dev/vda bs=512 count="$2" 2>/dev/null | sha256sum)
    echo "PATTERN ${sum%% *}"
    ;;
write)
    start=$2 seq=$3 count=$4 run=$5
    end=$((seq + count))
    while [ "$seq" -lt "$end" ]; do
        fill=$(head -c 180 /dev/urandom | od -An -tx1 | tr -d ' \n')
        body=$(printf 'TBREC1 %010d %s %s' "$seq" "$run" "$fill")
        sum=$(printf '%s' "$body" | sha256sum)
        if printf '%s %s\n' "$body" "${sum%% *}" |
            dd of=/dev/vda bs=512 count=1 seek=$((start + seq)) \
                iflag=fullblock oflag=direct conv=sync,notrunc,fsync 2>/tmp/dd.err; then
            echo "SYNCED $seq"
        else
            echo "WRITE FAILED $seq: $(tail -n 1 /tmp/dd.err)"
            exit 1
        fi
        seq=$((seq + 1))
    done
    echo "WRITER DONE $((end - 1))"
    ;;
fat)
    dev=$2
    shift 2
    mount -t vfat -o ro "$dev" /mnt || { echo "FAT MOUNT FAILED $dev"; exit 1; }
    for f in "$@"; do
        sum=$(sha256sum "/mnt/$f") || { echo "FAT READ FAILED $f"; continue; }
        echo "FATSUM ${sum%% *} $f"
    done
    umount /mnt
    echo "FAT DONE"
    ;;
off)
    sync
    echo "TESTBED-GUEST: powering off"
    poweroff -f
    ;;
*)
    echo "usage: tb pattern|write|fat|off ..." >&2
    exit 2
    ;;
esac
