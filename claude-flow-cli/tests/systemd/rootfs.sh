#!/bin/bash
# rootfs.sh TARGET_DIR: builds the system test's root file system into
# TARGET_DIR/systemd-rootfs unless it is there, made with the same
# debootstrap arguments. A minimal Debian bookworm (minbase: only
# Priority required packages, so neither procps nor ca-certificates) with
# systemd, and git for the workflow. Built beside its final place and
# renamed into it, so an interrupted build is never taken for a finished
# one; a lock lets a second caller (CI starts it early, in the background)
# wait for the first. Exit 3: debootstrap is not installed.
set -euo pipefail
target=$1
rootfs=$target/systemd-rootfs
args=(--variant=minbase --include=systemd,systemd-sysv,dbus,git bookworm)
stamp="${args[*]}"
built() { [ "$(cat "$rootfs/claude-flow-rootfs" 2>/dev/null)" = "$stamp" ]; }
built && exit 0
mkdir -p "$target"
exec 9>"$target/systemd-rootfs.lock"
flock 9
built && exit 0
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "debootstrap is not installed (Debian package debootstrap)" >&2
    exit 3
fi
# Left by runs that were interrupted: their process is gone.
for dir in "$target"/systemd-rootfs.partial-*; do
    [ -e "$dir" ] || continue
    [ -e "/proc/${dir##*-}" ] || rm -rf "$dir"
done
partial=$target/systemd-rootfs.partial-$$
mirror=${CLAUDE_FLOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log=$target/systemd-rootfs.log
start=$SECONDS
if ! debootstrap "${args[@]}" "$partial" "$mirror" >"$log" 2>&1; then
    rm -rf "$partial"
    echo "debootstrap from $mirror failed; the end of $log:" >&2
    tail -20 "$log" >&2
    exit 1
fi
# The downloaded packages are not needed once unpacked.
rm -f "$partial"/var/cache/apt/archives/*.deb
printf '%s' "$stamp" >"$partial/claude-flow-rootfs"
if [ -e "$rootfs" ]; then
    # Made with other arguments.
    mv "$rootfs" "$target/systemd-rootfs.partial-old-$$"
    rm -rf "$target/systemd-rootfs.partial-old-$$"
fi
mv "$partial" "$rootfs"
echo "debootstrap built $rootfs in $((SECONDS - start)) s"
