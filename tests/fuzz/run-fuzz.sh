#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds the libFuzzer targets with clang (address+undefined) and runs each
# for FUZZ_SECONDS (default 20).  Skips (77) when clang's fuzzer runtime is
# missing, unless CI=true.  Usage: run-fuzz.sh SRCDIR
set -euo pipefail
src=${1:-$(dirname "$0")/../..}
secs=${FUZZ_SECONDS:-20}
if ! command -v clang >/dev/null || ! echo 'int LLVMFuzzerTestOneInput(const char*d,unsigned long s){return 0;}' |
	clang -x c -fsanitize=fuzzer - -o /dev/null 2>/dev/null; then
	echo "clang with libFuzzer not found"
	[ "${CI:-}" = true ] && exit 1 || exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cflags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
	-D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -DSTREAMFS_VERSION=\"fuzz\"
	-I"$src/include" -I"$src")
common=("$src/common/parse.c" "$src/common/range.c" "$src/common/log.c")
clang "${cflags[@]}" -o "$work/fuzz-control" "$src/tests/fuzz/fuzz-control.c" \
	"$src/fs/control_parse.c" "${common[@]}"
clang "${cflags[@]}" -o "$work/fuzz-manifest" "$src/tests/fuzz/fuzz-manifest.c" \
	"$src/common/manifest.c" "${common[@]}" -lcrypto
clang "${cflags[@]}" -o "$work/fuzz-meta" "$src/tests/fuzz/fuzz-meta.c" \
	"$src/cache/meta.c" "$src/cache/bitmap.c" "${common[@]}"
for t in control manifest meta; do
	mkdir -p "$work/corpus-$t"
	cp "$src"/tests/fuzz/corpus/$t/* "$work/corpus-$t/" 2>/dev/null || true
	echo "fuzzing $t for ${secs}s"
	"$work/fuzz-$t" -max_total_time="$secs" -max_len=8192 -print_final_stats=1 \
		"$work/corpus-$t" 2>"$work/$t.log" || { tail -40 "$work/$t.log"; exit 1; }
	grep -E "stat::number_of_executed_units|Done" "$work/$t.log" | tail -2
done
echo "fuzz: 3 passed, 0 failed"
