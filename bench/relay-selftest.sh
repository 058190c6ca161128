#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Self-test for bench/relay.c: builds the relay, serves a 64 MiB random
# file from a python3 http.server on 127.0.0.1, and checks through the
# relay that data arrives intact (whole file, 64 concurrent clients), that a tiny request pays one emulated round trip, and that an
# aborted client leaves the relay serving.  Prints throughput direct, at
# 0 ms and at 10 ms delay.  Everything lives in one temp dir and every
# process is stopped by PID on exit, failure included.
#
# Exit status: 0 pass, 1 fail, 77 skip (missing tool, outside CI).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
delay_ms=10
size_mib=64

skip() {
	echo "relay-selftest: SKIP: $*" >&2
	if [ "${CI:-}" = true ]; then exit 1; fi
	exit 77
}
fail() {
	echo "relay-selftest: FAIL: $*" >&2
	exit 1
}

for tool in cc python3 curl cmp awk; do
	command -v "$tool" >/dev/null 2>&1 || skip "$tool not found"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/relay-selftest.XXXXXX")
pids=()
cleanup() {
	local rc=$? pid
	trap - EXIT INT TERM
	for pid in "${pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$tmp"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits up to 10 s for a port file, then prints its port.
wait_port() {
	local file=$1 pid=$2 i
	for i in $(seq 100); do
		if [ -s "$file" ]; then
			cat "$file"
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || fail "process $pid for $file died"
		sleep 0.1
	done
	fail "timed out waiting for $file"
}

# Starts a relay in front of the http server; sets relay_pid, relay_port.
start_relay() {
	local delay=$1 name=$2
	"$tmp/relay" --listen 127.0.0.1:0 --connect "127.0.0.1:$http_port" \
		--delay-ms "$delay" --port-file "$tmp/$name.port" --stats \
		2>"$tmp/$name.log" &
	relay_pid=$!
	pids+=("$relay_pid")
	relay_port=$(wait_port "$tmp/$name.port" "$relay_pid")
}

# Best of three downloads of the big file; prints MB/s (10^6 bytes).
throughput() {
	local port=$1 best=0 i bps
	for i in 1 2 3; do
		bps=$(curl -s -f -o /dev/null -w '%{speed_download}' \
			"http://127.0.0.1:$port/blob") || fail "download via port $port"
		best=$(awk -v a="$best" -v b="$bps" 'BEGIN { print (b > a ? b : a) }')
	done
	awk -v b="$best" 'BEGIN { printf "%.0f\n", b / 1e6 }'
}

# Fastest of three tiny requests on new connections; prints ms.
latency() {
	local port=$1 best=1e9 i t
	for i in 1 2 3; do
		t=$(curl -s -f -o /dev/null -w '%{time_total}' \
			"http://127.0.0.1:$port/tiny") || fail "tiny request via port $port"
		best=$(awk -v a="$best" -v b="$t" 'BEGIN { print (b < a ? b : a) }')
	done
	awk -v t="$best" 'BEGIN { printf "%.1f\n", t * 1000 }'
}

cc -O2 -Wall -Wextra -pthread -o "$tmp/relay" "$here/relay.c" 2>"$tmp/cc.log" ||
	{ cat "$tmp/cc.log" >&2; fail "relay does not build"; }
if [ -s "$tmp/cc.log" ]; then
	cat "$tmp/cc.log" >&2
	fail "relay builds with warnings"
fi

mkdir "$tmp/www"
head -c "$((size_mib << 20))" /dev/urandom >"$tmp/www/blob"
head -c "$((1 << 20))" "$tmp/www/blob" >"$tmp/www/small"
printf x >"$tmp/www/tiny"

# A quiet threaded http.server that sends file bodies with sendfile(2), so
# that python is not the bottleneck being measured.
python3 - "$tmp/www" "$tmp/http.port" >"$tmp/http.log" 2>&1 <<'EOF' &
import functools, http.server, os, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def copyfile(self, source, outputfile):
        outputfile.flush()
        self.connection.sendfile(source)

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256

root, port_file = sys.argv[1], sys.argv[2]
srv = Server(("127.0.0.1", 0), functools.partial(Handler, directory=root))
with open(port_file + ".tmp", "w") as f:
    f.write("%d\n" % srv.server_address[1])
os.rename(port_file + ".tmp", port_file)
srv.serve_forever()
EOF
http_pid=$!
pids+=("$http_pid")
http_port=$(wait_port "$tmp/http.port" "$http_pid")

start_relay 0 relay0
relay0_pid=$relay_pid relay0_port=$relay_port
start_relay "$delay_ms" relayd
relayd_pid=$relay_pid relayd_port=$relay_port

# The whole file through the delaying relay.
curl -s -f -o "$tmp/out" "http://127.0.0.1:$relayd_port/blob" ||
	fail "download through relay"
cmp "$tmp/www/blob" "$tmp/out" || fail "file differs after relay"

# 64 concurrent clients, each fetching a 1 MiB file.
curl_pids=()
for i in $(seq 0 63); do
	curl -s -f -o "$tmp/part.$i" "http://127.0.0.1:$relayd_port/small" &
	curl_pids+=($!)
done
failed=0
for pid in "${curl_pids[@]}"; do
	wait "$pid" || failed=$((failed + 1))
done
[ "$failed" -eq 0 ] || fail "$failed of 64 concurrent downloads failed"
for i in $(seq 0 63); do
	cmp "$tmp/www/small" "$tmp/part.$i" || fail "concurrent download $i differs"
done
rm -f "$tmp"/part.* "$tmp/out"

# A client that gives up mid-transfer must not disturb the relay.
curl -s -o /dev/null --max-time 0.2 "http://127.0.0.1:$relayd_port/blob" || true
kill -0 "$relayd_pid" || fail "relay died after client abort"

lat_direct=$(latency "$http_port")
lat_delay=$(latency "$relayd_port")
awk -v t="$lat_delay" -v min="$((2 * delay_ms))" 'BEGIN { exit !(t >= min) }' ||
	fail "tiny request took $lat_delay ms, expected >= $((2 * delay_ms)) ms"

tp_direct=$(throughput "$http_port")
tp_zero=$(throughput "$relay0_port")
tp_delay=$(throughput "$relayd_port")

echo "tiny request: direct ${lat_direct} ms, relay ${delay_ms} ms delay ${lat_delay} ms"
echo "throughput (${size_mib} MiB, best of 3): direct ${tp_direct} MB/s," \
	"relay 0 ms ${tp_zero} MB/s, relay ${delay_ms} ms ${tp_delay} MB/s"

# Sanity bounds.  Default window 6 MiB over a 2 * delay round trip caps
# one connection near 6 MiB / 20 ms = 315 MB/s; kernel socket buffers at
# either end add a little, so only a gross excess means the window leaks.
awk -v z="$tp_zero" -v d="$tp_delay" 'BEGIN { exit !(z > d) }' ||
	fail "0 ms relay is not faster than ${delay_ms} ms relay"
awk -v d="$tp_delay" -v ms="$delay_ms" \
	'BEGIN { cap = 6 * 1048576 / (2 * ms / 1000) / 1e6; exit !(d < 2 * cap && d > cap / 4) }' ||
	fail "${delay_ms} ms throughput $tp_delay MB/s is far from window/RTT"

# Both relays must exit 0 on SIGTERM.
for pid in "$relay0_pid" "$relayd_pid"; do
	kill -TERM "$pid"
	rc=0
	wait "$pid" || rc=$?
	[ "$rc" -eq 0 ] || fail "relay $pid exited $rc on SIGTERM"
done
if grep -v -e '^relay: listening' -e '^relay: conn [0-9]* closed' \
	-e '^relay: caught signal' "$tmp"/relay*.log; then
	fail "unexpected relay messages above"
fi
echo "relay-selftest: PASS"
