#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Lint suite: banned functions in C sources, SPDX lines, and mandoc -T lint
# of the man pages when mandoc is present.  Usage: lint.sh SRCDIR
set -uo pipefail
src=${1:-.}
cd "$src"
fail=0
files=$(git ls-files '*.c' '*.h' 2>/dev/null || find . -name '*.[ch]' -not -path './build*')
banned='\b(sprintf|vsprintf|strcpy|strcat|strtok|atoi|atol|gets)\s*\('
if grep -nE "$banned" $files | grep -v '^tests/fuzz/' ; then
	echo "lint: banned function used (see above)"; fail=1
fi
if grep -nE '\bf(seek|seeko|read|write)\s*\(' cache/*.c; then
	echo "lint: stdio I/O in cache/ (use pread/pwrite)"; fail=1
fi
for f in $files; do
	head -2 "$f" | grep -q 'SPDX-License-Identifier: MIT' || { echo "lint: $f: no SPDX line"; fail=1; }
done
if command -v mandoc >/dev/null; then
	for m in man/*.[0-9]; do
		out=$(mandoc -T lint -W warning "$m" 2>&1) || true
		if [ -n "$out" ]; then echo "$out"; fail=1; fi
	done
fi
if [ $fail -eq 0 ]; then echo "lint: 1 passed, 0 failed"; else echo "lint: 0 passed, 1 failed"; fi
exit $fail
