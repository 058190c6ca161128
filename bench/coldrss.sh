#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Peak RSS of the daemon under concurrent cold readers:
#   bench/coldrss.sh BUILD_DIR CHUNK READERS [manual|auto]
# Serves the bench's 1 GiB random template (made by bench/run.sh in
# /var/tmp/streamfs-bench-cache) from nginx on loopback, adds it with chunk
# size CHUNK, mounts it (stream=manual, or auto: streaming at full speed
# meanwhile), and lets READERS threads each make 12 cold 4 KiB O_DIRECT
# reads at random offsets.  Prints the reads' p50 and max, and the
# daemon's VmHWM.  Root, nginx, python3.  See BENCHMARKS.md (5).
set -euo pipefail

build=${1:?build dir}
chunk=${2:?chunk size}
readers=${3:?readers}
stream=${4:-manual}
tpl=/var/tmp/streamfs-bench-cache/random-1024M.img
[ -r "$tpl" ] || { echo "coldrss: $tpl missing: run bench/run.sh once" >&2; exit 1; }

w=$(mktemp -d /var/tmp/coldrss.XXXXXX)
chmod 755 "$w"
mkdir -p "$w/ngx/logs" "$w/ngx/tmp" "$w/www" "$w/img" "$w/mnt"
chmod 755 "$w/www"
ln -s "$tpl" "$w/www/r"
port=$((20000 + RANDOM % 20000))
cat >"$w/ngx/nginx.conf" <<EOF
worker_processes 2; error_log logs/error.log warn; pid logs/nginx.pid;
events { worker_connections 1024; }
http { access_log off; sendfile on; keepalive_requests 1000000; tcp_nodelay on;
 default_type application/octet-stream; client_body_temp_path tmp/body;
 proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/f; uwsgi_temp_path tmp/u;
 scgi_temp_path tmp/s;
 server { listen 127.0.0.1:$port; root $w/www; } }
EOF
nginx -p "$w/ngx/" -c "$w/ngx/nginx.conf" -g 'daemon off;' &
ngx=$!
sfs=
cleanup() {
	fusermount3 -u "$w/mnt" 2>/dev/null || true
	[ -n "$sfs" ] && wait "$sfs" || true
	kill -TERM "$ngx"
	wait "$ngx" || true
	rm -rf "$w"
}
trap cleanup EXIT
sleep 0.5
"$build/streamfsctl" add "$w/img" r "http://127.0.0.1:$port/r" --chunk-size "$chunk" >/dev/null
"$build/streamfs" -f -o "stream=$stream" "$w/img" "$w/mnt" 2>/dev/null &
sfs=$!
while ! mountpoint -q "$w/mnt"; do sleep 0.05; done
python3 - "$w/mnt/r" "$readers" <<'EOF'
import mmap, os, random, sys, threading, time
path, n = sys.argv[1], int(sys.argv[2])
lat = []
def reader(k):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(k)
    for _ in range(12):
        off = rng.randrange((1 << 30) // 4096) * 4096
        t0 = time.perf_counter()
        os.preadv(fd, [buf], off)
        lat.append(time.perf_counter() - t0)
    os.close(fd)
threads = [threading.Thread(target=reader, args=(k,)) for k in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat.sort()
print("%d reads: p50 %.1f ms, max %.1f ms" % (len(lat), lat[len(lat) // 2] * 1e3, lat[-1] * 1e3))
EOF
grep VmHWM "/proc/$sfs/status"
