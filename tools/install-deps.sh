#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs the Debian 12 packages that building, running and testing
# streamfs need.  Idempotent; needs root (or sudo).
set -euo pipefail
pkgs=(build-essential meson ninja-build pkg-config clang
      libfuse3-dev fuse3 libcurl4-openssl-dev libssl-dev libcmocka-dev
      nginx-light qemu-utils attr python3 openssl curl mandoc)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# nginx-light's package starts a system nginx on port 80; the tests run
# their own instances and do not need it.
