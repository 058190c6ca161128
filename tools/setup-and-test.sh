#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs dependencies, builds streamfs twice (plain with warnings as
# errors, and with ASan+UBSan) and runs every test suite in both builds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh

# Tests run the real mount: make sure FUSE is usable before blaming code.
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing" >&2; exit 1; }

rc=0
meson setup build-ci --wipe -Dwerror=true -Dtests=enabled >/dev/null 2>&1 ||
	meson setup build-ci -Dwerror=true -Dtests=enabled
ninja -C build-ci
meson test -C build-ci --print-errorlogs --num-processes 2 || rc=1

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export LSAN_OPTIONS=suppressions="$PWD/tests/lsan.supp"
meson setup build-asan --wipe -Db_sanitize=address,undefined -Db_lundef=false -Dtests=enabled >/dev/null 2>&1 ||
	meson setup build-asan -Db_sanitize=address,undefined -Db_lundef=false -Dtests=enabled
ninja -C build-asan
meson test -C build-asan --print-errorlogs --num-processes 2 || rc=1

if [ $rc -eq 0 ]; then echo "setup-and-test: all suites passed in both builds"; fi
exit $rc
