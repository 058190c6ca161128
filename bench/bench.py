#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""
streamfs benchmark suite (see BENCHMARKS.md).  Python 3 standard library only.

Generates its templates (a 2 GiB ext4 image of a real file tree, a 1 GiB
random file), serves them from nginx
on 127.0.0.1 and through bench/relay.c at a 20 ms round trip (and, for
section random only, at a LAN-like 0.5 ms round trip and 64 KiB window),
and measures streamfs against a baseline in the same run, as ratios:

  stream   full streaming time vs `curl -s -o FILE`           (1, 5, 6)
  warm     warm re-read through the mount vs the local image  (2)
  cold     cold-cache read via the mount vs libfuse passthrough and direct (2)
  partial  re-reads of present data of an incomplete disk vs the local image,
           direct-io (default) and -o nodirectio                 (2)
  random   cold random 4 KiB reads, 1 and 8 readers           (3)
  ttfb     mount start -> first 4 KiB read returns            (4)
  demand   cold 4 KiB read latency while streaming vs idle, reads of
           the streaming disk and of another disk of the mount (7)
  seq      cold sequential dd through the mount vs curl       (8)
  huge     peak RSS with a 1 TiB sparse template              (5)
  coldrss  peak RSS under 8 concurrent cold readers, 1M and 16M chunks,
           with and without a full-speed stream                 (5)
  sweep    streaming throughput vs chunk size and connections (plots)
  chunklat cold random 4 KiB read latency vs chunk size

Writes bench/results/results.md, results.json and the plots.  Every
process it starts is stopped by PID and every mount unmounted on exit,
failure or signal.  Must run as root (drop_caches, FUSE, nginx).
"""
import argparse
import atexit
import datetime
import http.client
import json
import math
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The relays in front of nginx: one-way delay (ms), window per connection,
# and the rate of a link all connections share (None: no such link).
# "lan" stands for a 1 Gbit/s LAN (0.5 ms round trip, about 128 MB/s a
# connection); only section random uses it.  "link" is a 20 ms round trip
# over a 25 MiB/s (about 200 Mbit/s) link that a stream's transfers and a
# VM's reads share, as they would over a real WAN; only section demand
# uses it.
RELAYS = {"wan": ("10", "6m", None), "lan": ("0.25", "64k", None), "link": ("10", "1m", "25m")}
NET = {"loopback": "loopback", "wan": "20 ms RTT", "lan": "LAN-like: 0.5 ms RTT, 64 KiB window",
       "link": "20 ms RTT over a shared 25 MiB/s link"}

SECTIONS = ["stream", "warm", "cold", "partial", "random", "ttfb", "demand", "seq", "huge",
            "coldrss", "sweep", "chunklat"]
SWEEP_CHUNKS = ["64K", "256K", "1M", "4M", "16M"]
SWEEP_CONNS = [1, 2, 4, 6, 8]
DEFAULT_CHUNK = "1M"  # used when streamfs --help names no default
DEFAULT_CONNS = 6


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def size_bytes(s):
    s = str(s)
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    if s[-1].upper() in mult:
        return int(s[:-1]) * mult[s[-1].upper()]
    return int(s)


def human(n):
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return ("%d %s" % (v, unit)) if v == int(v) else ("%.1f %s" % (v, unit))
    return "%d B" % n


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def large_folio_share(path, length):
    """Share of the first length bytes of path, in the page cache already,
    that sit in large folios (KPF_COMPOUND_HEAD/TAIL in /proc/kpageflags,
    found through a mapping and /proc/self/pagemap; root only).  A re-read
    copies out of 4 KiB pages more slowly than out of large folios."""
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        for off in range(0, length, 4096):
            mm[off]  # map every page: a minor fault, the page is cached
        addr = None
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if line.rstrip().endswith(" " + path) and hi - lo == length:
                    addr = lo
        if addr is None:
            raise RuntimeError("large_folio_share: no mapping of %s" % path)
        large = pages = 0
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            for off in range(0, length, 4096):
                pm.seek((addr + off) // 4096 * 8)
                e = int.from_bytes(pm.read(8), "little")
                if not e >> 63:  # not present
                    continue
                kf.seek((e & ((1 << 55) - 1)) * 8)
                flags = int.from_bytes(kf.read(8), "little")
                pages += 1
                large += bool(flags & (1 << 15 | 1 << 16))
        return large / pages if pages else 0.0
    finally:
        mm.close()


def pct(xs, p):
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * p / 100.0
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("process %d exited before listening on %d" % (proc.pid, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on port %d" % port)


def run_threads(target, args_list):
    """Runs target(*args) in one thread per args, all at once, and returns
    the wall time.  Targets report their errors themselves."""
    ts = [threading.Thread(target=target, args=args) for args in args_list]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def read_through(path):
    """Reads a file to warm the page cache (server side)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    return None


def timed_run(argv):
    """Runs argv, returns (wall seconds, cpu seconds of the child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    t1 = time.perf_counter()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError("%s exited %d" % (argv[0], p.returncode))
    return t1 - t0, ru.ru_utime + ru.ru_stime


class Mount:
    def __init__(self, bench, proc, imgdir, mnt, t_spawn, kind="streamfs"):
        self.bench, self.proc, self.imgdir, self.mnt = bench, proc, imgdir, mnt
        self.t_spawn, self.kind = t_spawn, kind
        self.pid = proc.pid

    def disk(self, name):
        return os.path.join(self.mnt, name)

    def xattr(self, name, attr):
        return os.getxattr(self.disk(name), "user.streamfs." + attr).decode()

    def control(self, cmd):
        fd = os.open(os.path.join(self.mnt, ".control"), os.O_WRONLY)
        try:
            os.write(fd, (cmd + "\n").encode())
        finally:
            os.close(fd)

    def wait_complete(self, name, timeout, cap=None):
        """Polls until complete; with cap, stops after cap seconds.
        Returns (seconds since spawn, completed?)."""
        end = time.monotonic() + timeout
        t_cap = self.t_spawn + cap if cap else None
        while True:
            state = self.xattr(name, "state")
            now = time.perf_counter()
            if state == "complete":
                return now - self.t_spawn, True
            if state == "error":
                raise RuntimeError("disk %s: %s" % (name, self.xattr(name, "error")))
            if t_cap and now >= t_cap:
                return now - self.t_spawn, False
            if self.proc.poll() is not None:
                raise RuntimeError("streamfs exited %d" % self.proc.returncode)
            if time.monotonic() > end:
                raise RuntimeError("disk %s not complete after %d s" % (name, timeout))
            time.sleep(0.005)

    def cpu(self):
        return proc_cpu(self.pid)

    def hwm(self):
        return proc_hwm(self.pid)

    def unmount(self):
        self.bench.unmount(self)


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (3 if args.quick else 5)
        self.sweep_runs = args.sweep_runs or (1 if args.quick else 5)
        self.procs = {}  # pid -> (Popen, what)
        self.mounts = []
        self.results = {"runs": self.runs, "sweep_runs": self.sweep_runs, "quick": self.quick}
        self.rng = random.Random(args.seed)
        self.tmp = None
        self.cleaned = False

    # ---------------------------------------------------------------- setup
    def setup(self):
        if os.geteuid() != 0:
            raise SystemExit("bench: must run as root (FUSE, drop_caches, nginx)")
        for tool in ("nginx", "curl", "dd", "fusermount3", "mke2fs", "cc", "gnuplot", "pkg-config"):
            if not shutil.which(tool):
                raise SystemExit("bench: %s not found" % tool)
        build = os.path.join(REPO, self.args.build)
        for b in ("streamfs", "streamfsctl"):
            if not os.access(os.path.join(build, b), os.X_OK):
                raise SystemExit("bench: %s/%s missing: run ninja -C %s" % (build, b, build))
        self.tmp = tempfile.mkdtemp(prefix="streamfs-bench.", dir=self.args.tmpdir)
        os.chmod(self.tmp, 0o755)
        log("work dir %s" % self.tmp)
        self.bin = os.path.join(self.tmp, "bin")
        os.mkdir(self.bin)
        for b in ("streamfs", "streamfsctl"):
            shutil.copy2(os.path.join(build, b), os.path.join(self.bin, b))
        self.results["build"] = {
            "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
            "binary_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
                os.path.getmtime(os.path.join(build, "streamfs"))))}
        self.streamfs = os.path.join(self.bin, "streamfs")
        self.ctl = os.path.join(self.bin, "streamfsctl")
        # Measure at the binary's own defaults unless told otherwise.
        help_text = subprocess.run([self.streamfs, "--help"], capture_output=True,
                                   text=True).stdout
        m = re.search(r"connections=N.*\(default (\d+)\)", help_text)
        self.conns = self.args.connections or (int(m.group(1)) if m else DEFAULT_CONNS)
        m = re.search(r"chunk_size=SIZE.*\(default (\w+)\)", help_text)
        self.chunk = self.args.chunk_size or (m.group(1) if m else DEFAULT_CHUNK)
        self.results.update(conns=self.conns, chunk=self.chunk,
                            defaults=not (self.args.connections or self.args.chunk_size))
        log("streamfs defaults in use: chunk %s, connections=%d" % (self.chunk, self.conns))
        subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", os.path.join(self.bin, "relay"),
                        os.path.join(HERE, "relay.c")], check=True)
        self.passthrough = None
        src = "/usr/share/doc/libfuse3-dev/examples/passthrough.c"
        if os.path.exists(src):
            flags = subprocess.run(["pkg-config", "fuse3", "--cflags", "--libs"], check=True,
                                   capture_output=True, text=True).stdout.split()
            out = os.path.join(self.bin, "passthrough")
            r = subprocess.run(["cc", "-O2", "-w", "-o", out, src] + flags)
            if r.returncode == 0:
                self.passthrough = out
        if not self.passthrough:
            log("libfuse passthrough example not available: cold read compared to direct read only")
        self.templates()
        self.start_servers()

    def templates(self):
        cache = self.args.cache
        os.makedirs(cache, exist_ok=True)
        os.chmod(cache, 0o755)
        if self.quick:
            vm_size, vm_data, rnd_size = 512 * MiB, 300 * MiB, 256 * MiB
        else:
            vm_size, vm_data, rnd_size = 2 * GiB, 1200 * MiB, 1 * GiB
        self.tpl = {}
        self.tpl["vm"] = self.vm_template(cache, vm_size, vm_data)
        self.tpl["random"] = self.random_template(cache, "random", rnd_size)
        self.sizes = {k: os.path.getsize(v) for k, v in self.tpl.items()}
        self.results["templates"] = {
            k: {"file": os.path.basename(v), "size": self.sizes[k],
                "allocated": os.stat(v).st_blocks * 512} for k, v in self.tpl.items()}

    def random_template(self, cache, name, size):
        path = os.path.join(cache, "%s-%dM.img" % (name, size // MiB))
        if not os.path.exists(path):
            log("generating %s (%s of random bytes)" % (path, human(size)))
            tmp = path + ".part"
            with open(tmp, "wb") as f:
                left = size
                while left:
                    n = min(left, 16 * MiB)
                    f.write(os.urandom(n))
                    left -= n
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
        return path

    def vm_template(self, cache, size, data_limit):
        path = os.path.join(cache, "vm-ext4-%dM.img" % (size // MiB))
        if os.path.exists(path):
            return path
        log("generating %s: ext4 of %s holding up to %s of /usr/share and /usr/lib"
            % (path, human(size), human(data_limit)))
        staging = tempfile.mkdtemp(prefix="staging.", dir=cache)
        try:
            total = 0
            for top in ("/usr/share", "/usr/lib"):
                for root, dirs, files in os.walk(top):
                    dirs.sort()
                    rel = os.path.relpath(root, "/")
                    dst_root = os.path.join(staging, rel)
                    os.makedirs(dst_root, exist_ok=True)
                    for fn in sorted(files):
                        src = os.path.join(root, fn)
                        dst = os.path.join(dst_root, fn)
                        try:
                            if os.path.islink(src):
                                os.symlink(os.readlink(src), dst)
                                continue
                            if not os.path.isfile(src):
                                continue
                            sz = os.path.getsize(src)
                            if total + sz > data_limit:
                                continue
                            shutil.copy2(src, dst)
                            total += sz
                        except OSError:
                            continue
                    if total >= data_limit - MiB:
                        break
            tmp = path + ".part"
            if os.path.exists(tmp):
                os.unlink(tmp)
            subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", staging, "-F", tmp,
                            "%dM" % (size // MiB)], check=True)
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
            log("  %s of files, %s allocated" % (human(total), human(os.stat(path).st_blocks * 512)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def spawn(self, argv, what, **kw):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        self.procs[p.pid] = (p, what)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=20):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.pop(p.pid, None)

    def start_servers(self):
        self.www = os.path.join(self.tmp, "www")
        os.mkdir(self.www)
        os.chmod(self.www, 0o755)
        for k, v in self.tpl.items():
            os.symlink(v, os.path.join(self.www, k + ".img"))
        huge = os.path.join(self.www, "huge.img")
        with open(huge, "wb") as f:
            f.truncate(1 << 40)
        os.chmod(huge, 0o644)
        ngx = os.path.join(self.tmp, "nginx")
        for d in ("logs", "tmp"):
            os.makedirs(os.path.join(ngx, d))
        for attempt in range(5):
            port = free_port()
            conf = os.path.join(ngx, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF % {"port": port, "root": self.www})
            p = self.spawn(["nginx", "-p", ngx + "/", "-c", conf, "-g", "daemon off;"], "nginx",
                           stderr=open(os.path.join(ngx, "stderr"), "w"))
            try:
                wait_port(port, p)
                break
            except RuntimeError:
                self.stop(p)
        else:
            raise RuntimeError("nginx does not start: see %s/stderr" % ngx)
        self.nginx = p
        self.port = {"loopback": port}
        log("nginx on 127.0.0.1:%d (pid %d)" % (port, p.pid))
        for net, (delay_ms, window, rate) in RELAYS.items():
            self.start_relay(net, delay_ms, window, rate)
        self.warm_templates()

    def start_relay(self, net, delay_ms, window, rate):
        """bench/relay in front of nginx, as network `net`."""
        pf = os.path.join(self.tmp, "relay-%s.port" % net)
        relay = self.spawn([os.path.join(self.bin, "relay"), "--listen", "127.0.0.1:0",
                            "--connect", "127.0.0.1:%d" % self.port["loopback"],
                            "--delay-ms", delay_ms, "--window", window, "--port-file", pf]
                           + (["--rate", rate] if rate else []),
                           "relay", stderr=open(os.path.join(self.tmp, "relay-%s.log" % net), "w"))
        end = time.monotonic() + 10
        while not (os.path.exists(pf) and open(pf).read().strip()):
            if relay.poll() is not None or time.monotonic() > end:
                raise RuntimeError("relay does not start")
            time.sleep(0.05)
        self.port[net] = int(open(pf).read())
        wait_port(self.port[net], relay)
        log("relay %s (%s ms each way, %s window%s) on 127.0.0.1:%d (pid %d)"
            % (NET[net], delay_ms, window, ", %s/s shared" % rate if rate else "",
               self.port[net], relay.pid))

    def warm_templates(self):
        for v in self.tpl.values():
            read_through(v)

    def url(self, net, name):
        return "http://127.0.0.1:%d/%s.img" % (self.port[net], name)

    # ------------------------------------------------------------- streamfs
    def new_imgdir(self):
        d = tempfile.mkdtemp(prefix="img.", dir=self.tmp)
        return d

    def add(self, imgdir, name, url, chunk=None):
        chunk = chunk or self.chunk
        subprocess.run([self.ctl, "add", imgdir, name, url, "--chunk-size", chunk], check=True,
                       stdout=subprocess.DEVNULL)

    def mount(self, imgdir, stream="auto", conns=None, extra=""):
        conns = conns or self.conns
        mnt = tempfile.mkdtemp(prefix="mnt.", dir=self.tmp)
        opts = "stream=%s,connections=%d" % (stream, conns) + (("," + extra) if extra else "")
        t0 = time.perf_counter()
        p = self.spawn([self.streamfs, "-f", "-o", opts, imgdir, mnt], "streamfs",
                       stderr=open(os.path.join(self.tmp, "streamfs.log"), "a"))
        m = Mount(self, p, imgdir, mnt, t0)
        self.mounts.append(m)
        end = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if p.poll() is not None:
                raise RuntimeError("streamfs exited %d at mount (see %s/streamfs.log)"
                                   % (p.returncode, self.tmp))
            if time.monotonic() > end:
                raise RuntimeError("streamfs did not mount in 20 s")
            time.sleep(0.001)
        m.t_mounted = time.perf_counter()
        return m

    def mount_passthrough(self):
        mnt = tempfile.mkdtemp(prefix="pt.", dir=self.tmp)
        p = self.spawn([self.passthrough, "-f", "-o", "ro", mnt], "passthrough",
                       stderr=open(os.path.join(self.tmp, "passthrough.log"), "a"))
        m = Mount(self, p, None, mnt, time.perf_counter(), kind="passthrough")
        self.mounts.append(m)
        end = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if p.poll() is not None or time.monotonic() > end:
                raise RuntimeError("passthrough did not mount")
            time.sleep(0.01)
        return m

    def unmount(self, m):
        if m not in self.mounts:
            return
        for _ in range(50):
            if not os.path.ismount(m.mnt):
                break
            r = subprocess.run(["fusermount3", "-u", m.mnt], stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        if os.path.ismount(m.mnt):
            subprocess.run(["fusermount3", "-uz", m.mnt], stderr=subprocess.DEVNULL)
        try:
            m.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.stop(m.proc)
        self.mounts.remove(m)
        try:
            os.rmdir(m.mnt)
        except OSError:
            pass

    def discard(self, *paths):
        for p in paths:
            if p and os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif p and os.path.exists(p):
                os.unlink(p)
        os.sync()

    def cleanup(self):
        if self.cleaned:
            return
        self.cleaned = True
        for m in list(self.mounts):
            try:
                self.unmount(m)
            except Exception as e:  # keep cleaning
                log("cleanup: unmount %s: %s" % (m.mnt, e))
        for pid, (p, what) in list(self.procs.items()):
            self.stop(p)
        if self.tmp and not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------- baselines
    def curl_download(self, url, out):
        """curl -s -o FILE: returns (seconds, cpu seconds, seconds incl. fdatasync)."""
        wall, cpu = timed_run(["curl", "-s", "-f", "-o", out, url])
        t0 = time.perf_counter()
        fd = os.open(out, os.O_RDONLY)
        os.fdatasync(fd)
        os.close(fd)
        return wall, cpu, wall + time.perf_counter() - t0

    def curl_chunk_latency(self, url, size, chunk, n):
        """n single-chunk range requests on one warm keep-alive connection
        (one curl, --next per request); the first (connecting) one dropped."""
        nchunks = size // chunk
        argv = ["curl"]
        for i in range(n + 1):
            if i:
                argv.append("--next")
            c = self.rng.randrange(nchunks)
            argv += ["-s", "-f", "-o", "/dev/null", "-w", "%{time_total} %{num_connects}\n",
                     "-r", "%d-%d" % (c * chunk, c * chunk + chunk - 1), url]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split("\n")
        times = [float(l.split()[0]) for l in out if l.strip()]
        return times[1:]

    def http_iops(self, net, name, chunk, readers, per_reader):
        """readers threads with a keep-alive connection each doing chunk range GETs."""
        nchunks = self.sizes[name] // chunk
        lat, errors = [], []

        def worker(offsets):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port[net], timeout=60)
                c.request("HEAD", "/%s.img" % name)
                c.getresponse().read()
                mine = []
                for off in offsets:
                    t0 = time.perf_counter()
                    c.request("GET", "/%s.img" % name,
                              headers={"Range": "bytes=%d-%d" % (off, off + chunk - 1)})
                    r = c.getresponse()
                    body = r.read()
                    mine.append(time.perf_counter() - t0)
                    if r.status != 206 or len(body) != chunk:
                        raise RuntimeError("bad range response %d" % r.status)
                c.close()
                lat.extend(mine)
            except Exception as e:
                errors.append(e)

        offs = [[self.rng.randrange(nchunks) * chunk for _ in range(per_reader)]
                for _ in range(readers)]
        wall = run_threads(worker, [(o,) for o in offs])
        if errors:
            raise errors[0]
        return readers * per_reader / wall, lat

    # --------------------------------------------------------------- (1)
    def stream_once(self, net, name, chunk=None, conns=None, cap=None,
                    keep=False):
        imgdir = self.new_imgdir()
        self.add(imgdir, name, self.url(net, name), chunk)
        m = self.mount(imgdir, "auto", conns)
        secs, done = m.wait_complete(name, timeout=1800, cap=cap)
        cached = int(m.xattr(name, "cached")) if not done else self.sizes[name]
        cpu, hwm = m.cpu(), m.hwm()
        self.unmount(m)
        if not keep:
            self.discard(imgdir)
        return {"seconds": secs, "complete": done, "bytes": cached, "cpu": cpu, "hwm": hwm,
                "mount_s": m.t_mounted - m.t_spawn, "imgdir": imgdir if keep else None}

    def sec_stream(self):
        res = {}
        self.stream_once("loopback", "random")  # warm-up, not measured
        for net in ("loopback", "wan"):
            for name in ("vm", "random"):
                key = "%s/%s" % (name, net)
                rows = []
                # loopback pairs take a second or two and are the noisiest: twice the runs
                for i in range(self.runs * (2 if net == "loopback" else 1)):
                    out = os.path.join(self.tmp, "curl.out")
                    pair = {}
                    order = ("curl", "sfs") if i % 2 == 0 else ("sfs", "curl")
                    for what in order:
                        if what == "curl":
                            w, c, ws = self.curl_download(self.url(net, name), out)
                            pair.update(curl_s=w, curl_cpu=c, curl_sync_s=ws)
                            self.discard(out)
                        else:
                            r = self.stream_once(net, name)
                            pair.update(sfs_s=r["seconds"], sfs_cpu=r["cpu"], sfs_hwm=r["hwm"],
                                        mount_s=r["mount_s"])
                    pair["ratio"] = pair["curl_s"] / pair["sfs_s"]
                    rows.append(pair)
                    log("stream %s run %d: streamfs %.2f s, curl %.2f s, ratio %.2f, cpu %.2f s, "
                        "hwm %s" % (key, i + 1, pair["sfs_s"], pair["curl_s"], pair["ratio"],
                                    pair["sfs_cpu"], human(pair["sfs_hwm"])))
                res[key] = rows
        self.results["stream"] = res

    # --------------------------------------------------------------- (2)
    def complete_vm(self):
        r = self.stream_once("loopback", "vm", keep=True)
        return r["imgdir"]

    def dd(self, path, bs="1M", count=None):
        """Seconds to read path with dd (count blocks of bs; all of it by default)."""
        argv = ["dd", "if=" + path, "of=/dev/null", "bs=" + bs, "status=none"]
        if count is not None:
            argv.append("count=%d" % count)
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        return time.perf_counter() - t0

    def sec_warm(self):
        """Page-cached re-read.  Each run starts from dropped caches and reads
        the same way through the mount and directly: dd twice, the second pass
        is the figure (a third pass is kept as the steady state)."""
        imgdir = self.complete_vm()
        img = os.path.join(imgdir, "vm.img")
        m = self.mount(imgdir, "manual")
        assert m.xattr("vm", "state") == "complete"
        rows = []
        for i in range(self.runs):
            row = {}
            for what in ("sfs", "direct") if i % 2 == 0 else ("direct", "sfs"):
                path = m.disk("vm") if what == "sfs" else img
                drop_caches()
                self.dd(path)
                row[what + "_s"] = self.dd(path)
                row[what + "_s3"] = self.dd(path)
            row["ratio"] = row["direct_s"] / row["sfs_s"]
            row["ratio3"] = row["direct_s3"] / row["sfs_s3"]
            rows.append(row)
            log("warm run %d: mount %.3f s (3rd pass %.3f), direct %.3f s (%.3f), ratio %.2f (%.2f)"
                % (i + 1, row["sfs_s"], row["sfs_s3"], row["direct_s"], row["direct_s3"],
                   row["ratio"], row["ratio3"]))
        self.unmount(m)
        self.results["warm"] = rows
        self.vm_complete = imgdir

    def sec_cold(self):
        imgdir = getattr(self, "vm_complete", None) or self.complete_vm()
        img = os.path.join(imgdir, "vm.img")
        m = self.mount(imgdir, "manual")
        pt = self.mount_passthrough() if self.passthrough else None
        rows = []
        for i in range(self.runs):
            row = {}
            for what in ("sfs", "pt", "direct") if i % 2 == 0 else ("direct", "pt", "sfs"):
                path = {"sfs": m.disk("vm"), "pt": pt and (pt.mnt + img), "direct": img}[what]
                if not path:
                    continue
                drop_caches()
                row[what + "_s"] = self.dd(path)
            row["ratio_direct"] = row["direct_s"] / row["sfs_s"]
            if "pt_s" in row:
                row["ratio_pt"] = row["pt_s"] / row["sfs_s"]
            rows.append(row)
            log("cold read run %d: %s" % (i + 1, ", ".join("%s %.2f" % kv for kv in row.items())))
        self.unmount(m)
        if pt:
            self.unmount(pt)
        self.results["cold"] = rows
        self.discard(imgdir)
        self.vm_complete = None
        self.warm_templates()

    PARTIAL_MODES = [("dio", "", "direct-io (default)"), ("cached", "nodirectio", "-o nodirectio")]

    def sec_partial(self):
        """Reads of present data of a disk that is not complete (a VM's
        disk while it streams): all but its last 64 MiB (twice the default
        read-ahead) are fetched by a cold dd, then dd re-reads them (2nd pass is the figure) with 1 MiB
        and 4 KiB blocks, and 4 KiB preads at random offsets; the same
        reads of the page-cached local image are the baseline.  For the
        page-cached mode and the image it also records how much of the
        first 64 MiB sits in large folios."""
        count = self.sizes["vm"] // MiB - 64
        small = min(256, count)  # MiB read with 4 KiB blocks
        nrand = 2000 if self.quick else 20000

        def rand_p50(path):
            fd = os.open(path, os.O_RDONLY)
            rng = random.Random(1)
            lat = []
            try:
                for _ in range(nrand):
                    off = rng.randrange(count * MiB // 4096) * 4096
                    t0 = time.perf_counter()
                    os.pread(fd, 4096, off)
                    lat.append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            return pct(lat, 50)

        def measure(path, folios=False):
            self.dd(path, count=count)
            r = {"s": self.dd(path, count=count), "s4k": self.dd(path, "4k", small * 256),
                 "rand_p50": rand_p50(path)}
            if folios:  # the page cache the re-reads copied from
                r["large_share"] = large_folio_share(path, min(64, count) * MiB)
            return r

        rows = []
        for i in range(self.runs):
            row = {}
            modes = self.PARTIAL_MODES if i % 2 == 0 else self.PARTIAL_MODES[::-1]
            for key, extra, _ in modes:
                imgdir = self.new_imgdir()
                self.add(imgdir, "vm", self.url("loopback", "vm"))
                m = self.mount(imgdir, "manual", extra=extra)
                disk = m.disk("vm")
                row[key + "_cold_s"] = self.dd(disk, count=count)
                r = measure(disk, folios=(key == "cached"))
                if m.xattr("vm", "state") == "complete":
                    raise RuntimeError("partial: the disk completed")
                row.update({key + "_" + k: v for k, v in r.items()})
                if "img_s" not in row:
                    row.update({"img_" + k: v for k, v in
                                measure(os.path.join(imgdir, "vm.img"), True).items()})
                self.unmount(m)
                self.discard(imgdir)
            rows.append(row)
            log("partial run %d: %s" % (i + 1, ", ".join(
                "%s %.4g" % kv for kv in sorted(row.items()))))
        self.results["partial"] = {"rows": rows, "count_mib": count, "small_mib": small,
                                   "nrand": nrand}

    # --------------------------------------------------------------- (3)
    def cold_reads(self, fd, offsets, readers):
        lat, errors = [], []
        per = [offsets[k::readers] for k in range(readers)]

        def worker(offs):
            mine = []
            try:
                for off in offs:
                    t0 = time.perf_counter()
                    b = os.pread(fd, 4096, off)
                    mine.append(time.perf_counter() - t0)
                    if len(b) != 4096:
                        raise RuntimeError("short read at %d" % off)
            except Exception as e:
                errors.append(e)
            lat.extend(mine)

        wall = run_threads(worker, [(p,) for p in per])
        if errors:
            raise errors[0]
        return lat, len(offsets) / wall

    def cold_offsets(self, chunks, chunk):
        return [c * chunk + self.rng.randrange(chunk // 4096) * 4096 for c in chunks]

    def sec_random(self):
        chunk = size_bytes(self.chunk)
        nchunks = self.sizes["vm"] // chunk
        n1, n8 = (40, 80) if self.quick else (100, 200)
        res = {}
        for net in ("loopback", "lan", "wan"):
            rows = []
            for i in range(self.runs):
                base = self.curl_chunk_latency(self.url(net, "vm"), self.sizes["vm"], chunk, 20)
                # The same from as many curl processes, one connection each, as
                # streamfs has connections: one connection's time to the first
                # byte can stay fast or slow for a whole run (BENCHMARKS.md (3)).
                pooled = [t for _ in range(self.conns) for t in
                          self.curl_chunk_latency(self.url(net, "vm"), self.sizes["vm"], chunk, 20)]
                b_iops1, b_lat1 = self.http_iops(net, "vm", chunk, 1, 50)
                b_iops8, _ = self.http_iops(net, "vm", chunk, min(8, self.conns),
                                            n8 // min(8, self.conns))
                imgdir = self.new_imgdir()
                self.add(imgdir, "vm", self.url(net, "vm"))
                m = self.mount(imgdir, "manual")
                fd = os.open(m.disk("vm"), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                chunks = self.rng.sample(range(nchunks), n1 + n8)
                lat1, iops1 = self.cold_reads(fd, self.cold_offsets(chunks[:n1], chunk), 1)
                lat8, iops8 = self.cold_reads(fd, self.cold_offsets(chunks[n1:], chunk), 8)
                os.close(fd)
                self.unmount(m)
                self.discard(imgdir)
                row = {"curl_chunk_p50": median(base), "http_1_p50": median(b_lat1),
                       "curl_pooled_p50": median(pooled), "curl_pooled_lat": pooled,
                       "curl_pooled_n": self.conns,
                       "curl_lat": base, "http_1_lat": b_lat1, "lat1": lat1, "lat8": lat8,
                       "http_iops1": b_iops1, "http_iops8": b_iops8,
                       "p50_1": pct(lat1, 50), "p99_1": pct(lat1, 99), "iops1": iops1,
                       "p50_8": pct(lat8, 50), "p99_8": pct(lat8, 99), "iops8": iops8}
                row["ratio_p50_1"] = row["p50_1"] / row["curl_chunk_p50"]
                rows.append(row)
                log("random 4K %s run %d: 1 reader p50 %.2f ms p99 %.2f ms %.0f IOPS; 8 readers "
                    "p50 %.2f ms p99 %.2f ms %.0f IOPS; curl chunk %.2f ms"
                    % (net, i + 1, row["p50_1"] * 1e3, row["p99_1"] * 1e3, iops1,
                       row["p50_8"] * 1e3, row["p99_8"] * 1e3, iops8, row["curl_chunk_p50"] * 1e3))
            res[net] = rows
        self.results["random"] = res

    # --------------------------------------------------------------- (4)
    def ttfb_once(self, net, stream):
        imgdir = self.new_imgdir()
        self.add(imgdir, "vm", self.url(net, "vm"))
        m = self.mount(imgdir, stream)
        fd = os.open(m.disk("vm"), os.O_RDONLY)
        b = os.pread(fd, 4096, 0)
        t = time.perf_counter() - m.t_spawn
        os.close(fd)
        assert len(b) == 4096
        mounted = m.t_mounted - m.t_spawn
        self.unmount(m)
        self.discard(imgdir)
        return t, mounted

    def sec_ttfb(self):
        """Mount start -> first 4 KiB read of a cold disk returns, with stream=auto
        (the streamer starts at chunk 0 at the same time) and stream=manual."""
        res = {}
        for net in ("loopback", "wan"):
            rows = []
            for i in range(self.runs):
                t, mounted = self.ttfb_once(net, "auto")
                tm, _ = self.ttfb_once(net, "manual")
                c, _ = timed_run(["curl", "-s", "-f", "-o", "/dev/null", "-r", "0-4095",
                                  self.url(net, "vm")])
                rows.append({"sfs_s": t, "mount_s": mounted, "manual_s": tm, "curl_s": c,
                             "ratio": t / c, "ratio_manual": tm / c})
                log("ttfb %s run %d: %.1f ms (mounted after %.1f ms), stream=manual %.1f ms, "
                    "curl 4 KiB %.1f ms" % (net, i + 1, t * 1e3, mounted * 1e3, tm * 1e3, c * 1e3))
            res[net] = rows
        self.results["ttfb"] = res

    # --------------------------------------------------------------- (7)
    def sec_demand(self):
        """Cold reads of disk vm while vm streams (the target; also over the
        shared link, where the stream's transfers and the reads compete for
        one link's bandwidth); over the shared link, reads 0.3 s apart of
        the chunks the streamer has in flight; and cold reads of disk vm2
        (the same template) while vm, another disk of the same mount,
        streams."""
        chunk = size_bytes(self.chunk)
        n = 30 if self.quick else 50
        res, other = {}, {}
        for net in ("loopback", "wan", "link"):
            res[net] = [self.demand_once(net, chunk, n, i, False) for i in range(self.runs)]
        res["in_flight"] = {"link": [self.demand_once("link", chunk, n, i, False, True)
                                     for i in range(self.runs)]}
        for net in ("loopback", "wan"):
            other[net] = [self.demand_once(net, chunk, n, i, True) for i in range(self.runs)]
        res["other_disk"] = other
        self.results["demand"] = res

    def demand_once(self, net, chunk, n, i, other, in_flight=False):
        imgdir = self.new_imgdir()
        self.add(imgdir, "vm", self.url(net, "vm"))
        read = "vm2" if other else "vm"
        if other:
            self.add(imgdir, "vm2", self.url(net, "vm"))
        nchunks = self.sizes["vm"] // chunk
        m = self.mount(imgdir, "manual")
        fd = os.open(m.disk(read), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        chunks = self.rng.sample(range(nchunks), n)
        used = set(chunks)
        idle, _ = self.cold_reads(fd, self.cold_offsets(chunks, chunk), 1)
        m.control("start vm")
        time.sleep(0.05)  # let the streamer reach full speed
        c0, t0 = int(m.xattr("vm", "cached")), time.perf_counter()
        busy, skipped = [], 0
        while len(busy) < n:
            # Reading vm itself: never a chunk the streamer has in flight,
            # but with in_flight, one of the 4 chunks from the streamer's
            # position on, which it is fetching (0.3 s apart, so that it
            # streams between the reads).  (The position is read either
            # way, so the variants pace their reads alike.)
            pos = int(m.xattr("vm", "position")) // chunk + (1 if in_flight else 16)
            pos = 0 if other else pos
            cand = [c for c in range(pos, nchunks) if c not in used]
            if in_flight:
                cand = cand[:4]
                time.sleep(0.3)
            if len(cand) < 4 or m.xattr("vm", "state") != "streaming":
                break
            c = self.rng.choice(cand)
            used.add(c)
            off = c * chunk + self.rng.randrange(chunk // 4096) * 4096
            t = time.perf_counter()
            os.pread(fd, 4096, off)
            t = time.perf_counter() - t
            if m.xattr("vm", "state") == "streaming":
                busy.append(t)
            else:
                skipped += 1
        c1, t1 = int(m.xattr("vm", "cached")), time.perf_counter()
        if not other:
            # Each read made one chunk ahead of the streamer present
            # itself: the streamer's own bytes are the rest.
            c1 -= (len(busy) + skipped) * chunk
        os.close(fd)
        self.unmount(m)
        self.discard(imgdir)
        row = {"idle_p50": pct(idle, 50), "idle_p99": pct(idle, 99),
               "busy_p50": pct(busy, 50), "busy_p99": pct(busy, 99),
               "busy_n": len(busy), "idle": idle, "busy": busy,
               "stream_rate": (c1 - c0) / (t1 - t0), "busy_s": t1 - t0}
        row["ratio_p99"] = row["busy_p99"] / row["idle_p99"] if busy else None
        row["ratio_p50"] = row["busy_p50"] / row["idle_p50"] if busy else None
        log("demand %s%s run %d: idle p50 %.2f p99 %.2f ms; streaming (%.0f MiB/s) "
            "p50 %.2f p99 %.2f ms over %d reads"
            % (net, ", reads of another disk" if other else
               ", reads of chunks in flight" if in_flight else "", i + 1,
               row["idle_p50"] * 1e3, row["idle_p99"] * 1e3,
               row["stream_rate"] / MiB, (row["busy_p50"] or 0) * 1e3,
               (row["busy_p99"] or 0) * 1e3, len(busy)))
        return row

    # --------------------------------------------------------------- (8)
    # (key, extra mount options, label); the first is the measurement with a target
    SEQ_VARIANTS = (("sfs", "", "mount defaults"),
                    ("sfs_ra0", "readahead=0", "-o readahead=0 (read-ahead off)"))

    def sec_seq(self):
        """dd through a stream=manual mount, as mounted by default and with
        streamfs's read-ahead off, against curl -o of the same file."""
        res = {"variants": [[k, x, l] for k, x, l in self.SEQ_VARIANTS]}
        for net in ("loopback", "wan"):
            rows = []
            # loopback runs take a second or two and are the noisiest: twice the runs
            for i in range(self.runs * (2 if net == "loopback" else 1)):
                row = {}
                order = ["curl"] + [v[0] for v in self.SEQ_VARIANTS]
                if i % 2:
                    order.reverse()
                for what in order:
                    if what == "curl":
                        out = os.path.join(self.tmp, "curl.out")
                        row["curl_s"] = self.curl_download(self.url(net, "vm"), out)[0]
                        self.discard(out)
                        continue
                    extra = {v[0]: v[1] for v in self.SEQ_VARIANTS}[what]
                    imgdir = self.new_imgdir()
                    self.add(imgdir, "vm", self.url(net, "vm"))
                    m = self.mount(imgdir, "manual", extra=extra)
                    row[what + "_s"] = self.dd(m.disk("vm"))
                    self.unmount(m)
                    self.discard(imgdir)
                for k, _, _ in self.SEQ_VARIANTS:
                    row[k + "_ratio"] = row["curl_s"] / row[k + "_s"]
                rows.append(row)
                log("cold sequential %s run %d: curl %.2f s; %s" % (
                    net, i + 1, row["curl_s"], "; ".join(
                        "%s %.2f s (%.2fx)" % (l, row[k + "_s"], row[k + "_ratio"])
                        for k, _, l in self.SEQ_VARIANTS)))
            res[net] = rows
        self.results["seq"] = res

    # --------------------------------------------------------------- (5)
    def sec_huge(self):
        imgdir = self.new_imgdir()
        t0 = time.perf_counter()
        self.add(imgdir, "huge", self.url("loopback", "huge"))
        add_s = time.perf_counter() - t0
        m = self.mount(imgdir, "manual")
        fd = os.open(m.disk("huge"), os.O_RDONLY)
        size = 1 << 40
        for _ in range(32):
            os.pread(fd, MiB, self.rng.randrange(size // MiB) * MiB)
        for _ in range(32):
            os.pread(fd, 4096, self.rng.randrange(size // 4096) * 4096)
        os.pread(fd, 4096, size - 4096)
        hwm_reads = m.hwm()
        # stream it for a few seconds, as the streamer walks the huge bitmap
        m.control("start huge")
        time.sleep(2)
        m.control("stop huge")
        streamed = int(m.xattr("huge", "cached"))
        hwm_stream = m.hwm()
        os.close(fd)
        meta = os.path.getsize(os.path.join(imgdir, "huge.meta"))
        mount_s = m.t_mounted - m.t_spawn
        self.unmount(m)
        self.discard(imgdir)
        self.results["huge"] = {"hwm_reads": hwm_reads, "hwm_stream": hwm_stream,
                                "streamed": streamed, "add_s": add_s, "mount_s": mount_s,
                                "meta_bytes": meta}
        log("1 TiB template: add %.2f s, mount %.3f s, meta %s, peak RSS %s after reads, %s "
            "after streaming %s" % (add_s, mount_s, human(meta), human(hwm_reads),
                                    human(hwm_stream), human(streamed)))

    # Peak RSS under concurrent cold readers: (chunk, readers, stream mode)
    COLDRSS_CASES = (("1M", 8, "manual"), ("1M", 8, "auto"),
                     ("16M", 8, "manual"), ("16M", 8, "auto"))

    def sec_coldrss(self):
        """Each reader thread makes 12 cold 4 KiB O_DIRECT reads at random
        offsets of the random template, all at once, on a fresh mount
        (stream=auto: while the streamer runs at full speed from the
        mount on); the daemon's VmHWM at the end."""
        size = self.sizes["random"]
        per = 6 if self.quick else 12
        res = []
        for chunk, readers, stream in self.COLDRSS_CASES:
            rows = []
            for i in range(min(self.runs, 3)):
                imgdir = self.new_imgdir()
                self.add(imgdir, "rnd", self.url("loopback", "random"), chunk=chunk)
                m = self.mount(imgdir, stream)
                path = m.disk("rnd")
                lat, errors = [], []

                def reader(k):
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    buf = mmap.mmap(-1, 4096)
                    rng = random.Random(self.args.seed * 1000 + i * 100 + k)
                    try:
                        for _ in range(per):
                            off = rng.randrange(size // 4096) * 4096
                            t0 = time.perf_counter()
                            if os.preadv(fd, [buf], off) != 4096:
                                raise RuntimeError("short read at %d" % off)
                            lat.append(time.perf_counter() - t0)
                    except Exception as e:
                        errors.append(e)
                    finally:
                        os.close(fd)
                        buf.close()

                run_threads(reader, [(k,) for k in range(readers)])
                hwm = m.hwm()
                self.unmount(m)
                self.discard(imgdir)
                if errors:
                    raise errors[0]
                rows.append({"hwm": hwm, "p50": pct(lat, 50), "max": max(lat)})
                log("coldrss %s chunks, %d readers, stream=%s, run %d: peak RSS %s, "
                    "p50 %.2f ms, max %.1f ms" % (chunk, readers, stream, i + 1, human(hwm),
                                                   rows[-1]["p50"] * 1e3, rows[-1]["max"] * 1e3))
            res.append({"chunk": chunk, "readers": readers, "stream": stream,
                        "reads": per, "runs": rows})
        self.results["coldrss"] = res

    # ------------------------------------------------------------- sweeps
    def sec_sweep(self):
        """Streaming throughput of the random template against chunk size and
        connections.  Runs stop after cap seconds (throughput = bytes present /
        time): small chunks at 20 ms would take minutes.  The 20 ms figures vary
        by a few per cent only, so they get at most 3 runs."""
        cap = 8 if self.quick else 15
        res = {"chunk": {}, "conns": {}, "curl": {}, "cap_s": cap, "runs": {}}
        name = "random"
        size = self.sizes[name]
        for net in ("loopback", "wan"):
            runs = self.sweep_runs if net == "loopback" else min(self.sweep_runs, 3)
            res["runs"][net] = runs
            out = os.path.join(self.tmp, "curl.out")
            cs = []
            for i in range(runs):
                cs.append(size / self.curl_download(self.url(net, name), out)[0])
                self.discard(out)
            res["curl"][net] = median(cs)
            for kind, values in (("chunk", SWEEP_CHUNKS), ("conns", SWEEP_CONNS)):
                for v in values:
                    chunk = v if kind == "chunk" else self.chunk
                    conns = v if kind == "conns" else self.conns
                    tps = []
                    for i in range(runs):
                        r = self.stream_once(net, name, chunk, conns, cap=cap)
                        tps.append(r["bytes"] / r["seconds"])
                    res[kind].setdefault(net, {})[str(v)] = {"runs": tps, "median": median(tps)}
                    log("sweep %s chunk=%s connections=%d: %.0f MiB/s (curl %.0f MiB/s)"
                        % (net, chunk, conns, median(tps) / MiB, res["curl"][net] / MiB))
        self.results["sweep"] = res

    def sec_chunklat(self):
        """Cold random 4 KiB read latency (1 reader) against chunk size, with a
        curl range GET of one chunk of that size as the baseline."""
        n = 20 if self.quick else 40
        runs = min(self.runs, 3)
        res = {"runs": runs, "reads": n}
        for net in ("loopback", "wan"):
            for cs in SWEEP_CHUNKS:
                chunk = size_bytes(cs)
                nchunks = self.sizes["vm"] // chunk
                lat, base = [], []
                for i in range(runs):
                    base += self.curl_chunk_latency(self.url(net, "vm"), self.sizes["vm"], chunk, 10)
                    imgdir = self.new_imgdir()
                    self.add(imgdir, "vm", self.url(net, "vm"), cs)
                    m = self.mount(imgdir, "manual")
                    fd = os.open(m.disk("vm"), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    l, _ = self.cold_reads(
                        fd, self.cold_offsets(self.rng.sample(range(nchunks), n), chunk), 1)
                    lat += l
                    os.close(fd)
                    self.unmount(m)
                    self.discard(imgdir)
                res.setdefault(net, {})[cs] = {"p50": pct(lat, 50), "p99": pct(lat, 99),
                                               "curl_p50": pct(base, 50)}
                log("chunk latency %s chunk=%s: cold 4 KiB read p50 %.2f ms p99 %.2f ms, curl "
                    "range GET of one chunk %.2f ms" % (net, cs, pct(lat, 50) * 1e3,
                                                        pct(lat, 99) * 1e3, pct(base, 50) * 1e3))
        self.results["chunklat"] = res

    # ------------------------------------------------------------- report
    def environment(self):
        env = {}
        try:
            with open("/proc/cpuinfo") as f:
                env["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            env["cpu"] = platform.processor()
        env["cores"] = os.cpu_count()
        with open("/proc/meminfo") as f:
            env["mem"] = int(f.readline().split()[1]) * KiB
        env["kernel"] = platform.release()
        r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--target", self.tmp],
                           capture_output=True, text=True)
        env["fs"] = " ".join(r.stdout.split()) or "?"

        def ver(argv):
            r = subprocess.run(argv, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else "?"
        env["nginx"] = ver(["nginx", "-v"])
        env["curl"] = ver(["curl", "--version"])
        env["fuse"] = ver(["pkg-config", "--modversion", "fuse3"])
        env["python"] = platform.python_version()
        env["commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip()
        env["load"] = os.getloadavg()
        env["date"] = datetime.datetime.now().isoformat(timespec="seconds")
        return env

    def report(self, ran):
        outdir = self.args.outdir
        os.makedirs(outdir, exist_ok=True)
        path = os.path.join(outdir, "results.json")
        self.results["env"] = self.environment()
        self.results["env"]["load_start"] = self.load_start
        self.results["elapsed_s"] = time.monotonic() - self.t_start
        R = self.results
        if self.args.update:
            # Re-ran some sections: keep the others from the earlier run.
            with open(path) as f:
                R = json.load(f)
            upd = R.setdefault("updated", {})
            for sec in ran:
                R[sec] = self.results[sec]
                upd[sec] = {"date": self.results["env"]["date"],
                            "commit": self.results["build"]["commit"],
                            "binary_mtime": self.results["build"]["binary_mtime"],
                            "runs": (self.results[sec].get("runs") if isinstance(
                                self.results[sec], dict) and isinstance(
                                self.results[sec].get("runs"), int) else self.runs)}
        with open(path, "w") as f:
            json.dump(R, f, indent=1, default=str)
        write_report(R, outdir)

    def run(self):
        self.t_start = time.monotonic()
        self.load_start = os.getloadavg()
        self.setup()
        only = self.args.only.split(",") if self.args.only else SECTIONS
        ran = []
        for s in SECTIONS:
            if s in only:
                log("== %s" % s)
                getattr(self, "sec_" + s)()
                ran.append(s)
        self.report(ran)


def write_report(R, outdir):
    pngs = plots(R, outdir) if "sweep" in R else []
    md = render_markdown(R, pngs)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(md)
    log("wrote %s/results.md" % outdir)
    print(md)


def plots(R, outdir):
    sw = R["sweep"]
    out = []
    for kind, values, xlabel, logx in (
            ("chunk", SWEEP_CHUNKS, "chunk size (connections=%d)" % R.get("conns", DEFAULT_CONNS),
             True),
            ("conns", SWEEP_CONNS, "connections (chunk size %s)" % R.get("chunk", DEFAULT_CHUNK),
             False)):
        dat = "sweep-%s.dat" % kind
        with open(os.path.join(outdir, dat), "w") as f:
            f.write("# x label loopback_MiB/s wan_MiB/s curl_loopback curl_wan\n")
            for v in values:
                x = size_bytes(v) // KiB if kind == "chunk" else v
                f.write("%d %s %.1f %.1f %.1f %.1f\n" % (
                    x, v, sw[kind]["loopback"][str(v)]["median"] / MiB,
                    sw[kind]["wan"][str(v)]["median"] / MiB,
                    sw["curl"]["loopback"] / MiB, sw["curl"]["wan"] / MiB))
        png = "sweep-%s.png" % kind
        gp = [
            "set terminal pngcairo size 900,560 font 'sans,11'",
            "set output '%s'" % png,
            "set title 'streamfs streaming throughput vs %s (%s random template)'"
            % ("chunk size" if kind == "chunk" else "connections",
               human(R["templates"]["random"]["size"])),
            "set xlabel '%s'" % xlabel,
            "set ylabel 'MiB/s (log scale)'",
            "set grid", "set key bottom right", "set logscale y", "set yrange [5:*]",
        ]
        if logx:
            gp += ["set logscale x 2", "set xrange [48:24576]"]
        else:
            gp += ["set xrange [0.5:8.5]", "set xtics (1,2,4,8)"]
        gp.append("plot '%s' using 1:3:xtic(2) with linespoints lw 2 pt 7 title 'loopback', "
                  "'' using 1:4 with linespoints lw 2 pt 5 title '20 ms RTT', "
                  "'' using 1:5 with lines dt 2 lw 1 lc rgb 'dark-green' title 'curl, loopback', "
                  "'' using 1:6 with lines dt 2 lw 1 lc rgb 'dark-red' title 'curl, 20 ms RTT'"
                  % dat)
        script = "sweep-%s.gp" % kind
        with open(os.path.join(outdir, script), "w") as f:
            f.write("\n".join(gp) + "\n")
        r = subprocess.run(["gnuplot", script], cwd=outdir)
        if r.returncode == 0:
            out.append(png)
    return out


NGINX_CONF = """\
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    # tcp_nopush (TCP_CORK) stays off: with it, ~1-2 %% of 1 MiB responses through
    # the delaying relay stall ~45 ms, for curl and python clients alike.
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 127.0.0.1:%(port)d;
        root %(root)s;
    }
}
"""


# ---------------------------------------------------------------- markdown
def fmt_s(x):
    if x is None:
        return "—"
    return "%.2f s" % x if x >= 1 else "%.1f ms" % (x * 1e3) if x >= 0.01 else "%.2f ms" % (x * 1e3)


def fmt_ms(x):
    return "—" if x is None else ("%.2f ms" % (x * 1e3) if x < 0.01 else "%.1f ms" % (x * 1e3))


def fmt_rate(nbytes, secs):
    return "%.0f MiB/s" % (nbytes / secs / MiB)


def verdict(ratio, target):
    if ratio is None or target is None:
        return ""
    op, v = target
    ok = ratio >= v if op == ">=" else ratio <= v
    return "yes" if ok else "**no**"


DEMAND_KINDS = {"": "", "in_flight": "; reads of chunks in flight, 0.3 s apart",
                "other_disk": "; reads of another disk of the mount"}


def demand_sets(dm):
    """(net, runs, kind) of section demand's results dm (or None): the reads
    of the streaming disk per net (kind ""), then those of chunks in flight
    ("in_flight") and of another disk ("other_disk")."""
    dm = dm or {}
    for net, runs in dm.items():
        if net not in DEMAND_KINDS:
            yield net, runs, ""
    for kind in ("in_flight", "other_disk"):
        for net, runs in dm.get(kind, {}).items():
            yield net, runs, kind


def demand_rows(row, net, runs, what, target):
    ok = [r for r in runs if r["busy_n"]]
    allb = [x for r in runs for x in r["busy"]]
    alli = [x for r in runs for x in r["idle"]]
    pb, pi = pct(allb, 99), pct(alli, 99)
    row("7", "cold 4 KiB read p99 while streaming at full speed vs idle (%s%s), "
        "pooled over runs (n=%d / %d)" % (NET[net], what, len(allb), len(alli)),
        fmt_ms(pb), "idle: " + fmt_ms(pi), pb / pi if allb else None, "latency", target)
    row("7", "same, median of per-run p99 (≈ 2nd-largest of %d reads)"
        % (len(runs[0]["idle"])),
        fmt_ms(median(r["busy_p99"] for r in ok)),
        "idle: " + fmt_ms(median(r["idle_p99"] for r in runs)),
        median(r["ratio_p99"] for r in ok), "latency", None)
    row("7", "cold 4 KiB read p50 while streaming vs idle (%s%s)" % (NET[net], what),
        fmt_ms(median(r["busy_p50"] for r in ok)),
        "idle: " + fmt_ms(median(r["idle_p50"] for r in runs)),
        median(r["ratio_p50"] for r in ok), "latency", None)


def render_markdown(R, pngs):
    env = R.get("env", {})
    L = []
    L.append("# streamfs benchmark results\n")
    bld = R.get("build", {})
    L.append("Generated by `bench/run.sh%s` on %s (HEAD %s when the run began, streamfs binary "
             "built %s) in %.0f min. "
             "Each figure is the median of %d runs (%d for full streaming and cold sequential "
             "reads on loopback, the noisiest; sweeps: see below), each run against its "
             "baseline measured in the same "
             "run; ratios are medians of the per-run ratios.\n"
             % (" --quick" if R.get("quick") else "", env.get("date", "?"), bld.get("commit", "?"),
                bld.get("binary_mtime", "?"), R.get("elapsed_s", 0) / 60, R["runs"],
                2 * R["runs"]))
    for sec, u in sorted(R.get("updated", {}).items()):
        L.append("Section `%s` was re-run later (`--only %s --update`, %d runs) on %s, HEAD %s, "
                 "streamfs binary built %s.\n" % (sec, sec, u.get("runs", 0), u["date"],
                                                   u["commit"], u["binary_mtime"]))
    L.append("Machine: %s, %s cores, %s RAM, kernel %s, local images on %s; %s; %s; "
             "libfuse %s. Load average at start %s, at end %s — other jobs share this machine, "
             "so figures are noisy.\n"
             % (env.get("cpu"), env.get("cores"), human(env.get("mem", 0)), env.get("kernel"),
                env.get("fs"), env.get("nginx"), " ".join(str(env.get("curl", "")).split()[:2]),
                env.get("fuse"), "%.2f" % R["env"]["load_start"][0] if "load_start" in env else "?",
                "%.2f" % env["load"][0] if "load" in env else "?"))
    tp = R.get("templates", {})
    if tp:
        L.append("Templates: " + "; ".join(
            "`%s` %s (%s allocated)" % (v["file"], human(v["size"]), human(v["allocated"]))
            for v in tp.values()) + ". Servers: nginx on 127.0.0.1 (sendfile), and the same "
            "nginx behind `bench/relay` at 20 ms round trip (10 ms each way, 6 MiB window) — "
            "\"WAN\" below — and, for (3) only, at 0.5 ms round trip (0.25 ms each way, "
            "64 KiB window: about 128 MB/s a connection, like a 1 Gbit/s LAN), and, for (7) "
            "only, at 20 ms round trip with a 1 MiB window over one 25 MiB/s link that all "
            "connections share in fair turns (`--rate 25m`). "
            "streamfs mounted with chunk %s, connections=%d%s.\n"
            % (R.get("chunk", DEFAULT_CHUNK), R.get("conns", DEFAULT_CONNS),
               " (the binary's defaults)" if R.get("defaults", True) else ""))
    L.append("| # | measurement | streamfs | baseline | ratio | target | met |")
    L.append("|---|---|---|---|---|---|---|")
    rows = []

    def row(num, what, s, b, ratio, rdesc, target):
        tdesc = "" if target is None else "%s %.1fx" % ("≥" if target[0] == ">=" else "≤", target[1])
        rows.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            num, what, s, b, "—" if ratio is None else "%.2fx %s" % (ratio, rdesc), tdesc,
            verdict(ratio, target)))

    sizes = {k: v["size"] for k, v in tp.items()}
    st = R.get("stream")
    if st:
        for key, runs in st.items():
            name, net = key.split("/")
            sz = sizes[name]
            s, c = median(r["sfs_s"] for r in runs), median(r["curl_s"] for r in runs)
            tgt = (">=", 1.0) if net == "loopback" else (">=", 1.5)
            row("1", "full streaming, %s %s template, %s" % (human(sz), "VM (ext4)" if name == "vm"
                                                             else "random", NET[net]),
                "%s (%s)" % (fmt_s(s), fmt_rate(sz, s)), "curl -o: %s (%s)" % (fmt_s(c), fmt_rate(sz, c)),
                median(r["ratio"] for r in runs), "speed", tgt)
    w = R.get("warm")
    if w:
        sz = sizes["vm"]
        s, d = median(r["sfs_s"] for r in w), median(r["direct_s"] for r in w)
        row("2", "warm re-read of complete disk (dd bs=1M, 2nd pass)",
            fmt_rate(sz, s), "local image, page-cached: " + fmt_rate(sz, d),
            median(r["ratio"] for r in w), "speed", (">=", 0.8))
        if "sfs_s3" in w[0]:
            s3, d3 = median(r["sfs_s3"] for r in w), median(r["direct_s3"] for r in w)
            row("2", "warm re-read, 3rd pass (steady state)", fmt_rate(sz, s3),
                "local image, 3rd pass: " + fmt_rate(sz, d3), median(r["ratio3"] for r in w),
                "speed", None)
    cold = R.get("cold")
    if cold:
        sz = sizes["vm"]
        s = median(r["sfs_s"] for r in cold)
        if any("pt_s" in r for r in cold):
            p = median(r["pt_s"] for r in cold if "pt_s" in r)
            row("2", "cold-cache read of complete disk (dd bs=1M)", fmt_rate(sz, s),
                "libfuse passthrough: " + fmt_rate(sz, p),
                median(r["ratio_pt"] for r in cold if "ratio_pt" in r), "speed", None)
        d = median(r["direct_s"] for r in cold)
        row("2", "cold-cache read of complete disk (dd bs=1M)", fmt_rate(sz, s),
            "local image direct: " + fmt_rate(sz, d), median(r["ratio_direct"] for r in cold),
            "speed", None)
    part = R.get("partial")
    if part:
        pr, n, n4 = part["rows"], part["count_mib"] * MiB, part["small_mib"] * MiB
        img = {k: median(r["img_" + k] for r in pr) for k in ("s", "s4k", "rand_p50")}
        for key, _, label in Bench.PARTIAL_MODES:
            s = median(r[key + "_s"] for r in pr)
            row("2", "re-read of present data, incomplete disk, dd bs=1M, %s" % label,
                fmt_rate(n, s), "local image, page-cached: " + fmt_rate(n, img["s"]),
                median(r["img_s"] / r[key + "_s"] for r in pr), "speed", None)
            s4 = median(r[key + "_s4k"] for r in pr)
            row("2", "same, dd bs=4k, %s" % label, fmt_rate(n4, s4),
                "local image: " + fmt_rate(n4, img["s4k"]),
                median(r["img_s4k"] / r[key + "_s4k"] for r in pr), "speed", None)
            p50 = median(r[key + "_rand_p50"] for r in pr)
            row("2", "same, random 4 KiB pread p50, %s" % label, "%.1f us" % (p50 * 1e6),
                "local image: %.1f us" % (img["rand_p50"] * 1e6),
                median(r[key + "_rand_p50"] / r["img_rand_p50"] for r in pr), "latency", None)
            c = median(r[key + "_cold_s"] for r in pr)
            row("2", "cold dd bs=1M of the same data, %s (loopback)" % label, fmt_rate(n, c),
                "—", None, "", None)
        if all("cached_large_share" in r for r in pr):
            row("2", "share of the re-read data in large folios, -o nodirectio (FUSE file's "
                "page cache)", "%.0f %%" % (100 * median(r["cached_large_share"] for r in pr)),
                "local image: %.0f %%" % (100 * median(r["img_large_share"] for r in pr)),
                None, "", None)
    rnd = R.get("random")
    if rnd:
        for net, runs in rnd.items():
            b = median(r["curl_chunk_p50"] for r in runs)
            row("3", "cold random 4 KiB read, 1 reader, p50 (%s)" % NET[net],
                fmt_ms(median(r["p50_1"] for r in runs)),
                "one 1 MiB range GET (curl, warm conn.): " + fmt_ms(b),
                median(r["ratio_p50_1"] for r in runs), "latency", ("<=", 1.5))
            if all("curl_pooled_p50" in r for r in runs):
                bp = median(r["curl_pooled_p50"] for r in runs)
                row("3", "same p50 against the GET pooled over %d curl processes, one "
                    "connection each (%s)" % (runs[0]["curl_pooled_n"], NET[net]),
                    fmt_ms(median(r["p50_1"] for r in runs)), "pooled GETs: " + fmt_ms(bp),
                    median(r["p50_1"] / r["curl_pooled_p50"] for r in runs), "latency", None)
            row("3", "cold random 4 KiB read, 1 reader, p99 (%s)" % NET[net],
                fmt_ms(median(r["p99_1"] for r in runs)), "same: " + fmt_ms(b),
                median(r["p99_1"] / r["curl_chunk_p50"] for r in runs), "latency", None)
            row("3", "cold random 4 KiB reads, 1 reader, IOPS (%s)" % NET[net],
                "%.0f" % median(r["iops1"] for r in runs),
                "1 keep-alive client, 1 MiB range GETs: %.0f/s" % median(r["http_iops1"] for r in runs),
                median(r["iops1"] / r["http_iops1"] for r in runs), "rate", None)
            row("3", "cold random 4 KiB reads, 8 readers, p50 / p99 (%s)" % NET[net],
                "%s / %s" % (fmt_ms(median(r["p50_8"] for r in runs)),
                             fmt_ms(median(r["p99_8"] for r in runs))), "—", None, "", None)
            row("3", "cold random 4 KiB reads, 8 readers, IOPS (%s)" % NET[net],
                "%.0f" % median(r["iops8"] for r in runs),
                "%d keep-alive clients (= connections), 1 MiB range GETs: %.0f/s"
                % (min(8, R.get("conns", DEFAULT_CONNS)), median(r["http_iops8"] for r in runs)),
                median(r["iops8"] / r["http_iops8"] for r in runs), "rate", None)
    tt = R.get("ttfb")
    if tt:
        for net, runs in tt.items():
            row("4", "time to first byte: mount start → first 4 KiB read, stream=auto (%s)" % NET[net],
                "%s (mounted at %s)" % (fmt_ms(median(r["sfs_s"] for r in runs)),
                                        fmt_ms(median(r["mount_s"] for r in runs))),
                "curl -r 0-4095, process start to exit: " + fmt_ms(median(r["curl_s"] for r in runs)),
                median(r["ratio"] for r in runs), "time", None)
            if "manual_s" in runs[0]:
                row("4", "same with stream=manual (no streamer at chunk 0) (%s)" % NET[net],
                    fmt_ms(median(r["manual_s"] for r in runs)),
                    "curl: " + fmt_ms(median(r["curl_s"] for r in runs)),
                    median(r["ratio_manual"] for r in runs), "time", None)
    if st:
        for key in ("vm/loopback", "vm/wan"):
            if key in st:
                runs = st[key]
                row("5", "peak RSS while streaming %s VM template (%s)"
                    % (human(sizes["vm"]), NET[key.split("/")[1]]),
                    human(max(r["sfs_hwm"] for r in runs)) + " (max of runs)", "64 MiB budget",
                    max(r["sfs_hwm"] for r in runs) / (64 * MiB), "of budget", ("<=", 1.0))
    hg = R.get("huge")
    if hg:
        row("5", "peak RSS, 1 TiB sparse template: scattered reads",
            human(hg["hwm_reads"]), "64 MiB budget", hg["hwm_reads"] / (64 * MiB), "of budget",
            ("<=", 1.0))
        row("5", "peak RSS, 1 TiB sparse template: then streaming %s" % human(hg["streamed"]),
            human(hg["hwm_stream"]), "64 MiB budget", hg["hwm_stream"] / (64 * MiB), "of budget",
            ("<=", 1.0))
    for c in R.get("coldrss") or []:
        peak = max(r["hwm"] for r in c["runs"])
        row("5", "peak RSS (max of %d runs), %d cold readers × %d reads at once, %s chunks, %s"
            % (len(c["runs"]), c["readers"], c["reads"], c["chunk"],
               "streaming at full speed meanwhile" if c["stream"] == "auto" else "no stream"),
            "%s (read p50 %s)" % (human(peak), fmt_ms(median(r["p50"] for r in c["runs"]))),
            "64 MiB budget", peak / (64 * MiB), "of budget",
            ("<=", 1.0) if c["chunk"] == DEFAULT_CHUNK else None)
    if st:
        for key, runs in st.items():
            name, net = key.split("/")
            g = sizes[name] / GiB
            s = median(r["sfs_cpu"] / g for r in runs)
            b = median(r["curl_cpu"] / g for r in runs)
            row("6", "CPU seconds per GiB streamed, %s template (%s)" % (name, NET[net]),
                "%.2f s/GiB" % s, "curl: %.2f s/GiB" % b,
                median((r["sfs_cpu"] / r["curl_cpu"]) if r["curl_cpu"] else None for r in runs),
                "CPU", None)
    dm = R.get("demand")
    for net, runs, kind in demand_sets(dm):
        demand_rows(row, net, runs, DEMAND_KINDS[kind], None if kind else ("<=", 2.0))
    sq = R.get("seq")
    if sq:
        sz = sizes["vm"]
        variants = sq.get("variants") or [["sfs", "", "mount defaults"]]
        for net in ("loopback", "wan"):
            runs = sq.get(net)
            if not runs:
                continue
            c = median(r["curl_s"] for r in runs)
            for n, (k, _, label) in enumerate(variants):
                if k + "_s" not in runs[0]:
                    continue
                s = median(r[k + "_s"] for r in runs)
                ratio = median(r.get(k + "_ratio", r["curl_s"] / r[k + "_s"]) for r in runs)
                row("8", "cold sequential read, 1 reader, dd bs=1M, stream=manual, %s (%s)"
                    % (label, NET[net]), "%s (%s)" % (fmt_s(s), fmt_rate(sz, s)),
                    "curl -o: %s (%s)" % (fmt_s(c), fmt_rate(sz, c)), ratio, "speed",
                    (">=", 0.8) if n == 0 else None)
    L += rows
    L.append("")
    L.append("Ratios: *speed* and *rate* = streamfs ÷ baseline (higher is better); *latency*, "
             "*time* and *CPU* = streamfs ÷ baseline (lower is better); *of budget* = peak RSS ÷ "
             "64 MiB.\n")

    sw = R.get("sweep")
    if sw:
        L.append("## Sweeps: streaming throughput (MiB/s; %s random template; median of %d runs on "
                 "loopback, %d at 20 ms; a run stops after %d s and counts the bytes present)\n"
                 % (human(sizes.get("random", 0)), sw["runs"]["loopback"], sw["runs"]["wan"],
                    sw["cap_s"]))
        for kind, values, title in (
                ("chunk", SWEEP_CHUNKS, "chunk size (connections=%d)" % R.get("conns", DEFAULT_CONNS)),
                ("conns", SWEEP_CONNS, "connections (chunk %s)" % R.get("chunk", DEFAULT_CHUNK))):
            L.append("| %s | loopback | 20 ms RTT |" % title)
            L.append("|---|---|---|")
            for v in values:
                L.append("| %s | %.0f | %.0f |" % (v, sw[kind]["loopback"][str(v)]["median"] / MiB,
                                                   sw[kind]["wan"][str(v)]["median"] / MiB))
            L.append("| curl -o (one connection) | %.0f | %.0f |\n"
                     % (sw["curl"]["loopback"] / MiB, sw["curl"]["wan"] / MiB))
        for p in pngs:
            L.append("![%s](%s)\n" % (p, p))
    cl = R.get("chunklat")
    if cl:
        L.append("## Cold random 4 KiB read latency against chunk size (1 reader, stream=manual, "
                 "%d runs x %d reads pooled; baseline: curl range GET of one chunk on a warm "
                 "connection)\n" % (cl["runs"], cl["reads"]))
        L.append("| chunk | loopback p50 | p99 | curl chunk GET | 20 ms RTT p50 | p99 | curl chunk GET |")
        L.append("|---|---|---|---|---|---|---|")
        for cs in SWEEP_CHUNKS:
            a, b = cl["loopback"][cs], cl["wan"][cs]
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                cs, fmt_ms(a["p50"]), fmt_ms(a["p99"]), fmt_ms(a["curl_p50"]),
                fmt_ms(b["p50"]), fmt_ms(b["p99"]), fmt_ms(b["curl_p50"])))
        L.append("")

    L.append("## Details\n")
    if st:
        L.append("Full streaming (per run, seconds): ")
        for key, runs in st.items():
            L.append("- %s: streamfs %s; curl %s; curl + fdatasync %s; streamfs mounted after %s"
                     % (key, " ".join("%.2f" % r["sfs_s"] for r in runs),
                        " ".join("%.2f" % r["curl_s"] for r in runs),
                        " ".join("%.2f" % r["curl_sync_s"] for r in runs),
                        " ".join("%.1f ms" % (r["mount_s"] * 1e3) for r in runs)))
        L.append("")
    if dm:
        for net, runs, kind in demand_sets(dm):
            what = DEMAND_KINDS[kind].replace(";", ",")
            allb = [x for r in runs for x in r["busy"]]
            alli = [x for r in runs for x in r["idle"]]
            slow = 2 * pct(alli, 50)
            L.append("Demand reads, %s%s, pooled over runs: idle n=%d p50 %s p90 %s p99 %s max %s, "
                     "%d slower than %s (2x idle p50); streaming n=%d p50 %s p90 %s p99 %s max %s, "
                     "%d slower than %s; per-run p99 idle %s, streaming %s; streamer during the "
                     "reads: %s MiB/s.\n"
                     % (NET[net], what, len(alli), fmt_ms(pct(alli, 50)), fmt_ms(pct(alli, 90)),
                        fmt_ms(pct(alli, 99)), fmt_ms(max(alli) if alli else None),
                        sum(x > slow for x in alli), fmt_ms(slow), len(allb),
                        fmt_ms(pct(allb, 50)), fmt_ms(pct(allb, 90)), fmt_ms(pct(allb, 99)),
                        fmt_ms(max(allb) if allb else None), sum(x > slow for x in allb),
                        fmt_ms(slow), " ".join(fmt_ms(r["idle_p99"]) for r in runs),
                        " ".join(fmt_ms(r["busy_p99"]) for r in runs),
                        " ".join("%.0f" % (r["stream_rate"] / MiB) for r in runs)))
    if rnd:
        for net, runs in rnd.items():
            hl = [x for r in runs for x in r["http_1_lat"] + r["curl_lat"]]
            l1 = [x for r in runs for x in r["lat1"]]
            L.append("Random reads, %s: baseline 1 MiB range GETs on a warm connection (curl and "
                     "http.client, pooled n=%d): p50 %s, p99 %s, max %s; streamfs 1 reader pooled "
                     "n=%d: p50 %s, p99 %s, max %s; streamfs p50 per run %s.\n"
                     % (NET[net], len(hl), fmt_ms(pct(hl, 50)), fmt_ms(pct(hl, 99)),
                        fmt_ms(max(hl)), len(l1), fmt_ms(pct(l1, 50)), fmt_ms(pct(l1, 99)),
                        fmt_ms(max(l1)), " ".join(fmt_ms(r["p50_1"]) for r in runs)))
    if cold:
        L.append("Cold-cache reads per run (s): " + "; ".join(
            ", ".join("%s %.2f" % (k, v) for k, v in r.items() if k.endswith("_s")) for r in cold)
            + "\n")
    if hg:
        L.append("1 TiB template: `streamfsctl add` %.2f s, metadata file %s, mount %s.\n"
                 % (hg["add_s"], human(hg["meta_bytes"]), fmt_ms(hg["mount_s"])))
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 runs, smaller templates (smoke test)")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 5, quick 3)")
    ap.add_argument("--sweep-runs", type=int, help="runs per sweep point (default 5, quick 1)")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--build", default="build", help="build directory (default build)")
    ap.add_argument("--cache", default=os.environ.get("STREAMFS_BENCH_CACHE",
                                                      "/var/tmp/streamfs-bench-cache"),
                    help="where generated templates are kept between runs")
    ap.add_argument("--tmpdir", default="/var/tmp", help="parent of the work dir (local images)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connections", type=int,
                    help="connections= for every mount outside the sweep (default: streamfs's)")
    ap.add_argument("--chunk-size", help="chunk size of every disk outside the sweep "
                    "(default: streamfs's)")
    ap.add_argument("--outdir", default=os.path.join(HERE, "results"),
                    help="where results.md, results.json and the plots go (default bench/results)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (debugging)")
    ap.add_argument("--update", action="store_true",
                    help="with --only: replace those sections in the existing results.json")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite results.md and plots from results.json")
    args = ap.parse_args()
    if args.only:
        bad = set(args.only.split(",")) - set(SECTIONS)
        if bad:
            ap.error("unknown sections: " + ",".join(sorted(bad)))

    if args.report_only:
        outdir = args.outdir
        with open(os.path.join(outdir, "results.json")) as f:
            write_report(json.load(f), outdir)
        return 0
    if args.update and not args.only:
        ap.error("--update needs --only")
    b = Bench(args)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(b.cleanup)
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
