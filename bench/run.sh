#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Runs the streamfs benchmark suite: bench/run.sh [--quick] [bench.py options]
# Builds streamfs if needed, then hands over to bench/bench.py, which writes
# bench/results/results.md and the sweep plots.  Needs root (FUSE mounts,
# drop_caches), nginx, curl, gnuplot, mke2fs, a C compiler and libfuse3-dev.
# See BENCHMARKS.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
build=${STREAMFS_BUILD:-build}

if [ "$(id -u)" -ne 0 ]; then
	echo "bench/run.sh: must run as root (FUSE, drop_caches, nginx)" >&2
	exit 1
fi
if [ ! -x "$repo/$build/streamfs" ]; then
	if [ ! -d "$repo/$build" ]; then
		meson setup "$repo/$build" "$repo" --buildtype=release
	fi
	ninja -C "$repo/$build"
elif ! ninja -C "$repo/$build" >/dev/null; then
	echo "bench/run.sh: warning: rebuild failed; benchmarking the binaries already in $build" >&2
fi
exec python3 "$here/bench.py" --build "$build" "$@"
