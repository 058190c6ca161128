#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The README's first command: installs dependencies, builds streamfs, makes
# a demo template, adds it as a disk from a file:// URL, mounts it, reads
# from it at once, and shows the background streamer's progress until the
# disk is a complete local copy.  Everything lives under $DEMO
# (default /tmp/streamfs-demo); the mount is undone at the end unless
# KEEP_MOUNTED=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
[ -d build ] || meson setup build >/dev/null
ninja -C build >/dev/null

DEMO=${DEMO:-/tmp/streamfs-demo}
bin=$PWD/build
mkdir -p "$DEMO"
cd "$DEMO"
if mountpoint -q mnt 2>/dev/null; then fusermount3 -u mnt; fi
rm -rf images mnt
mkdir -p images mnt
if [ ! -f template.raw ]; then
	echo "== making a 256 MiB demo template (random data with holes)"
	truncate -s 256M template.raw
	for i in 0 3 7 12 40 41 42 100 200 255; do
		dd if=/dev/urandom of=template.raw bs=1M seek=$i count=1 conv=notrunc status=none
	done
fi

echo "== streamfsctl add images demo file://$DEMO/template.raw"
"$bin/streamfsctl" add images demo "file://$DEMO/template.raw"
echo "== streamfs -o speed=64M images mnt      (streaming limited to 64 MiB/s for the show)"
"$bin/streamfs" -o speed=64M images mnt
trap 'if [ "${KEEP_MOUNTED:-0}" != 1 ]; then fusermount3 -u "$DEMO/mnt" 2>/dev/null || true; fi' EXIT
ls -l mnt
echo "== instant-on: read 4 KiB at 100 MiB before it is streamed"
od -A d -t x1 -j $((100 << 20)) -N 32 mnt/demo
echo "== progress xattrs"
getfattr -d -m user.streamfs mnt/demo
echo "== streamfsctl status"
"$bin/streamfsctl" status mnt
echo "== streamfsctl wait mnt/demo"
"$bin/streamfsctl" wait mnt/demo --timeout 120
"$bin/streamfsctl" status mnt
echo "== the disk equals its template:"
cmp mnt/demo template.raw && echo "mnt/demo and template.raw are identical"
if [ "${KEEP_MOUNTED:-0}" = 1 ]; then
	echo "== still mounted on $DEMO/mnt; unmount with: fusermount3 -u $DEMO/mnt"
else
	echo "== unmounting; images/demo.img is now a complete raw image"
fi
