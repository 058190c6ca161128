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

# A third build with ThreadSanitizer for the streamer, fetch pool and lock
# paths (the fuzzers build their own sanitizers and are not repeated).
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
meson setup build-tsan --wipe -Db_sanitize=thread -Db_lundef=false -Dtests=enabled >/dev/null 2>&1 ||
	meson setup build-tsan -Db_sanitize=thread -Db_lundef=false -Dtests=enabled
ninja -C build-tsan
meson test -C build-tsan --print-errorlogs --num-processes 2 --suite unit --suite integration || rc=1

# One closing line over the three builds.
python3 - build-ci build-asan build-tsan <<'PY'
import json, sys
passed = failed = skipped = 0
for d in sys.argv[1:]:
    try:
        with open(f"{d}/meson-logs/testlog.json") as f:
            for line in f:
                r = json.loads(line).get("result")
                if r == "OK":
                    passed += 1
                elif r == "SKIP":
                    skipped += 1
                else:
                    failed += 1
    except FileNotFoundError:
        failed += 1
print(f"setup-and-test: {passed} passed, {failed} failed, {skipped} skipped")
PY
exit $rc
