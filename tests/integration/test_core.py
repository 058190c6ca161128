# SPDX-License-Identifier: MIT
"""Core integration tests: demand reads through a real FUSE mount against
nginx, persistence across remounts, QEMU as a client, `streamfsctl add`
argument and server checks, mount-time errors and clean shutdown.

Run: python3 tests/integration/test_core.py [test_name...]
(meson: meson test -C build --suite integration -v)
"""

import errno
import mmap
import os
import re
import signal
import threading
import time

import harness as h
from harness import KiB, MiB, fail



ws = h.workspace


def template(kind):
    sizes = {
        "big.img": 64 * MiB + 4097,
        "one.img": 1,
        "small.img": 12345,
        "odd3m.img": 3 * MiB + 17,
        "conc.img": 8 * MiB + 333,
        "qemu.img": 6 * MiB,
        "persist.img": 24 * MiB + 4097,
        "manual.img": 16 * MiB + 1,
        "whole.img": 5 * MiB + 333,
        "budget.img": 128 * MiB,
    }
    return ws().template(kind, sizes[kind])


def image_dir():
    return ws().mkdir("images", unique=True)


def expect_equal(what, got, want):
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
        fail(f"{what}: {len(got)} bytes differ from the expected {len(want)} "
             f"(first difference at byte {i})")


def expect_cmp(disk, t):
    st = os.stat(disk)
    if st.st_size != t.size:
        fail(f"{disk}: size {st.st_size}, template {t.size}")
    p = h.run(["cmp", disk, t.path], timeout=120)
    if p.returncode != 0:
        fail(f"cmp {disk} {t.path}: {p.stdout_text.strip()} {p.stderr_text.strip()}")
    got = h.sha256_file(disk)
    if got != t.sha256:
        fail(f"sha256 of {disk} is {got}, template {t.sha256}")


def expect_one_line_error(what, rc, err):
    lines = err.splitlines()
    problems = []
    if rc == 0:
        problems.append("exit code 0")
    if len(lines) != 1 or not lines[0].strip():
        problems.append(f"stderr has {len(lines)} lines, expected exactly one non-empty line")
    if problems:
        fail(f"{what}: {', '.join(problems)}; stderr: {err!r}")
    return lines[0]


def chunks_of(first, last, chunk):
    return range(first // chunk, last // chunk + 1)


def check_fetches(recs, chunk, size):
    """Every request is a 206 range GET, chunk-aligned, with a complete body."""
    for r in recs:
        if r.method != "GET" or r.status != 206:
            fail(f"unexpected request from streamfs: {r!r}")
    rs = h.ranges_of(recs)
    h.check_chunk_aligned(rs, chunk, size)
    for r, (a, b) in zip(recs, rs):
        if r.body_bytes != b - a + 1:
            fail(f"{r!r}: body {r.body_bytes} bytes for a {b - a + 1}-byte range")
    return rs


def dd_read(path, off, count):
    p = h.run(["dd", f"if={path}", "bs=4096", f"skip={off}",
               "iflag=skip_bytes,count_bytes", f"count={count}", "status=none"],
              timeout=60)
    if p.returncode != 0:
        fail(f"dd at offset {off} of {path} failed: {p.stderr_text.strip()}")
    return p.stdout


class ReadInThread:
    """pread in a daemon thread, so a hung read cannot hang the test."""

    def __init__(self, path, off, length, direct=False):
        self.result = self.error = None
        self.elapsed = None
        self.thread = threading.Thread(target=self._run, args=(path, off, length, direct),
                                       daemon=True)
        self.t0 = time.monotonic()
        self.thread.start()

    def _run(self, path, off, length, direct):
        try:
            if direct:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                try:
                    buf = mmap.mmap(-1, length)  # page-aligned
                    n = os.preadv(fd, [buf], off)
                    self.result = buf[:n]
                finally:
                    os.close(fd)
            else:
                self.result = h.pread_all(path, off, length)
        except OSError as e:
            self.error = e
        self.elapsed = time.monotonic() - self.t0

    def join(self, timeout):
        self.thread.join(timeout)
        return not self.thread.is_alive()


# ---------------------------------------------------------------------------
# Demand reads
# ---------------------------------------------------------------------------

def test_cold_read_fetches_only_covered_chunks():
    t = template("big.img")
    chunk = MiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "big", ng.url(t.name), chunk_size="1M")
        st = os.stat(os.path.join(img, "big.img"))
        if st.st_size != t.size:
            fail(f"big.img has size {st.st_size}, template {t.size}")
        if st.st_blocks * 512 > 2 * chunk:
            fail(f"big.img is not sparse after add: {st.st_blocks * 512} bytes allocated")
        with h.Mount(ws(), img) as m:
            # Inside one chunk, then straddling a chunk boundary.
            for off in (37 * MiB + 12345, 41 * MiB - 1001):
                ng.mark()
                data = dd_read(m.path("big"), off, 4096)
                expect_equal(f"4 KiB at {off}", data, t.read(off, 4096))
                recs = ng.records()
                rs = check_fetches(recs, chunk, t.size)
                if not h.covered(rs, off, off + 4095):
                    fail(f"read at {off} returned data but the log shows no fetch of it: {recs}")
                first_chunk = off // chunk
                for a, b in rs:
                    if a // chunk < first_chunk or b // chunk > first_chunk + 1:
                        fail(f"read at {off} fetched {a}-{b}: outside chunks "
                             f"{first_chunk}..{first_chunk + 1}: {recs}")
                sent = h.total_bytes(recs)
                need = len(chunks_of(off, off + 4095, chunk))
                if sent > 2 * chunk:
                    fail(f"4 KiB read at {off} (covering {need} chunk(s)) made nginx send "
                         f"{sent} bytes, more than 2 chunks: {recs}")
                h.log(f"cold 4 KiB read at {off}: {len(recs)} request(s), {sent} bytes "
                      f"({need} chunk(s) covered)")


def test_concurrent_readers_fetch_each_chunk_once():
    t = template("conc.img")
    region_off, region_len = 5 * MiB, MiB
    piece = 64 * KiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "c1m", ng.url(t.name), chunk_size="1M")
        h.ctl_add(img, "c64k", ng.url(t.name), chunk_size="64K")
        with h.Mount(ws(), img) as m:
            for name, chunk in (("c1m", MiB), ("c64k", 64 * KiB)):
                ng.mark()
                path = m.path(name)
                want = t.read(region_off, region_len)
                barrier = threading.Barrier(8)
                errors = []

                def reader(i, path=path, want=want, barrier=barrier, errors=errors):
                    direct = i % 2 == 0
                    try:
                        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                    except OSError as e:
                        errors.append(f"reader {i}: open (O_DIRECT={direct}): {e}")
                        barrier.abort()
                        return
                    try:
                        buf = mmap.mmap(-1, piece)  # page-aligned, for O_DIRECT
                        try:
                            barrier.wait(timeout=30)
                        except threading.BrokenBarrierError:
                            return
                        n = region_len // piece
                        for k in range(n):
                            p = (k + 2 * i) % n
                            off = region_off + p * piece
                            if direct:
                                got = os.preadv(fd, [buf], off)
                                data = buf[:got]
                            else:
                                data = os.pread(fd, piece, off)
                            if data != want[p * piece:(p + 1) * piece]:
                                errors.append(f"reader {i}: wrong bytes at {off} "
                                              f"({len(data)} bytes read)")
                                return
                    except OSError as e:
                        errors.append(f"reader {i}: {e}")
                    finally:
                        os.close(fd)

                threads = [threading.Thread(target=reader, args=(i,), daemon=True)
                           for i in range(8)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(60)
                if any(th.is_alive() for th in threads):
                    fail(f"{name}: concurrent readers still blocked after 60 s")
                if errors:
                    fail(f"{name}: " + "; ".join(errors))
                recs = ng.records()
                rs = check_fetches(recs, chunk, t.size)
                ov = h.overlapping(rs)
                if ov:
                    fail(f"{name}: overlapping fetches (a chunk fetched twice): {ov}; {recs}")
                first, last = region_off, region_off + region_len - 1
                in_region = sum(max(0, min(b, last) - max(a, first) + 1) for a, b in rs)
                if in_region != region_len:
                    fail(f"{name}: {in_region} bytes of the {region_len}-byte region fetched, "
                         f"expected each byte exactly once: {recs}")
                h.log(f"{name}: 8 concurrent readers, {len(recs)} request(s), "
                      f"{h.total_bytes(recs)} bytes sent")


def test_cold_readers_share_a_bounded_buffer_budget():
    # Readers are answered before their chunk is stored, and each cold
    # reader holds a fetch buffer of a chunk: without a bound, 8 cold
    # readers of 16M chunks through 8 connections took the daemon to 74-90
    # MiB.  Demand buffers together stay within 16 MiB (two chunks with
    # 16M chunks), so peak RSS stays under SPEC's 64 MiB, and the readers
    # take turns instead.  Not under sanitizers, whose shadow memory is RSS
    # too.
    t = template("budget.img")
    chunk = 16 * MiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "budget", ng.url(t.name), chunk_size="16M")
        ng.mark()
        opts = ("stream=manual", "readahead=0", "connections=8")
        with h.Mount(ws(), img, opts=opts) as m:
            offs = [k * chunk + (k + 1) * 4096 for k in range(t.size // chunk)]
            rds = [ReadInThread(m.path("budget"), off, 4096, direct=True) for off in offs]
            for rd, off in zip(rds, offs):
                if not rd.join(60):
                    fail(f"the read at {off} did not return within 60 s")
                if rd.error is not None:
                    fail(f"the read at {off} failed: {rd.error!r}\nstderr:\n{m.stderr()}")
                expect_equal(f"4 KiB at {off}", rd.result, t.read(off, 4096))
            with open(f"/proc/{m.pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            with open(f"/proc/{m.pid}/maps") as f:
                maps = f.read()
            sanitized = "libasan" in maps or "libtsan" in maps
            h.log(f"{len(offs)} cold readers of 16M chunks at once: peak RSS {hwm // 1024} MiB"
                  + (" (sanitizer build: not checked)" if sanitized else ""))
            if not sanitized and hwm > 64 * 1024:
                fail(f"peak RSS {hwm // 1024} MiB with {len(offs)} cold readers of 16M chunks, "
                     "above 64 MiB")
        starts = [(off // chunk) * chunk for off in offs]
        recs = ng.records()
        rs = check_fetches(recs, chunk, t.size)
        if sorted(a for a, _ in rs) != starts:
            fail(f"expected one fetch per chunk read: {recs}")


def test_whole_disk_cmp_odd_sizes():
    cases = [("d1", "one.img", None), ("d12345", "small.img", "64K"),
             ("d3m", "odd3m.img", None), ("d3m64k", "odd3m.img", "64K")]
    for _, tname, _ in cases:
        template(tname)
    with h.Nginx(ws()) as ng:
        img = image_dir()
        for name, tname, cs in cases:
            h.ctl_add(img, name, ng.url(tname), chunk_size=cs)
        ng.mark()
        with h.Mount(ws(), img) as m:
            listing = h.listdir_set(m.mnt)
            names = {c[0] for c in cases}
            if not names <= listing or not listing - names <= {".control"}:
                fail(f"mount lists {sorted(listing)}, expected {sorted(names)} (+ .control)")
            for name, tname, cs in cases:
                t = template(tname)
                expect_cmp(m.path(name), t)
                p = h.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                           m.path(name), t.path])
                if p.returncode != 0:
                    fail(f"qemu-img compare {name}: rc {p.returncode}: "
                         f"{p.stdout_text.strip()} {p.stderr_text.strip()}")
            recs = ng.records()
            for name, tname, cs in cases:
                t = template(tname)
                chunk = 64 * KiB if cs == "64K" else MiB
                mine = [r for r in recs if r.uri == "/" + tname]
                # Both odd3m disks fetch the same template: check what the
                # log can tell apart (alignment to the smaller chunk).
                rs = check_fetches(mine, min(chunk, 64 * KiB) if tname == "odd3m.img" else chunk,
                                   t.size)
                if tname != "odd3m.img" and h.overlapping(rs):
                    fail(f"{name}: a chunk was fetched twice: {mine}")


# ---------------------------------------------------------------------------
# QEMU as a client
# ---------------------------------------------------------------------------

HEXLINE = re.compile(r"^([0-9a-f]{8,}):  (.*)$")


def qemu_io_read(path, reads, extra):
    """Runs qemu-io -f raw EXTRA -c 'read -v OFF LEN'...; returns
    {offset: bytes} from its hex dump."""
    cmd = ["qemu-io", "-f", "raw", *extra]
    for off, length in reads:
        cmd += ["-c", f"read -v {off} {length}"]
    cmd.append(path)
    p = h.run(cmd, timeout=120)
    out = p.stdout_text
    messages = [l for l in out.splitlines() if not HEXLINE.match(l)]
    if p.returncode != 0 or any("fail" in l or "error" in l.lower() for l in messages):
        fail(f"{' '.join(cmd)}: rc {p.returncode}\n{out}\n{p.stderr_text}")
    dump = {}
    for line in out.splitlines():
        mt = HEXLINE.match(line)
        if mt:
            addr = int(mt.group(1), 16)
            hexpart = mt.group(2).split("  ", 1)[0]
            dump[addr] = bytes.fromhex(hexpart.replace(" ", ""))
    result = {}
    for off, length in reads:
        buf = bytearray()
        a = off
        while a < off + length:
            if a not in dump:
                fail(f"qemu-io output lacks the dump line for {a:#x}:\n{out}")
            buf += dump[a]
            a += len(dump[a])
        result[off] = bytes(buf[:length])
        if f"read {length}/{length} bytes at offset {off}" not in out:
            fail(f"qemu-io did not report a full read at {off}:\n{out}")
    return result


def test_qemu_clients():
    t = template("qemu.img")
    reads = [(0, 4096), (MiB + 8192, 8192), (3 * MiB - 4096, 8192), (t.size - 4096, 4096)]
    modes = [("writeback", ["--cache=writeback"]),
             ("none", ["--cache=none"]),
             ("nocache-native-ro", ["-r", "-n", "--aio=native"])]
    with h.Nginx(ws()) as ng:
        img = image_dir()
        for mode, _ in modes:
            h.ctl_add(img, f"q-{mode}", ng.url(t.name))
        h.ctl_add(img, "q-convert", ng.url(t.name), chunk_size="64K")
        with h.Mount(ws(), img) as m:
            for mode, extra in modes:
                got = qemu_io_read(m.path(f"q-{mode}"), reads, extra)
                for off, length in reads:
                    expect_equal(f"qemu-io cache={mode} read at {off}", got[off],
                                 t.read(off, length))
                # The same reads again, now served locally.
                got = qemu_io_read(m.path(f"q-{mode}"), reads, extra)
                for off, length in reads:
                    expect_equal(f"qemu-io cache={mode} warm read at {off}", got[off],
                                 t.read(off, length))
            # The whole cold disk through O_DIRECT (qemu-img -T none).
            out = os.path.join(ws().mkdir("qemu-out", unique=True), "copy.raw")
            p = h.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-T", "none",
                       m.path("q-convert"), out], timeout=120)
            if p.returncode != 0:
                fail(f"qemu-img convert -T none: {p.stderr_text.strip()}")
            if h.sha256_file(out) != t.sha256:
                fail("qemu-img convert -T none of the disk differs from the template")
            p = h.run(["qemu-img", "info", "-f", "raw", "--output=json", m.path("q-convert")])
            if p.returncode != 0 or f'"virtual-size": {t.size}' not in p.stdout_text:
                fail(f"qemu-img info: {p.stdout_text} {p.stderr_text}")


# ---------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------

OFFLINE_ERRORS = [r"(?i)connect|refused|fetch|timed? ?out|timeout|input/output|\bEIO\b|"
                  r"unreachable|network|http|curl|range"]


def test_persistence_and_offline_eio():
    t = template("persist.img")
    opts = ("stream=manual", "timeout=2")
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "p", ng.url(t.name))
    r_off, r_len = 2 * MiB + 100, 300 * KiB
    ng.mark()
    with h.Mount(ws(), img, opts=opts) as m:
        first = h.pread_all(m.path("p"), r_off, r_len)
        expect_equal("first read", first, t.read(r_off, r_len))
        ng.records()  # let in-flight requests finish before unmounting
    fetched = h.ranges_of(ng.records())
    ng.stop()
    # A chunk the first mount did not fetch (whatever read-ahead did),
    # looking from the end of the disk.
    chunk = MiB
    absent = [c for c in range(t.size // chunk - 1, -1, -1)
              if not any(a <= c * chunk + chunk - 1 and b >= c * chunk for a, b in fetched)]
    if len(absent) < 2:
        fail(f"reading {r_len} bytes fetched nearly the whole {t.size}-byte disk: {fetched}")
    with h.Mount(ws(), img, opts=opts, allow=OFFLINE_ERRORS) as m:
        again = h.pread_all(m.path("p"), r_off, r_len)
        expect_equal("re-read of present data with nginx stopped", again, first)
        # O_DIRECT: one FUSE read, so EIO should come after about
        # timeout=2 s.  Buffered: the kernel retries a failed read-ahead
        # with a second read, so allow two timeouts and some slack.
        for direct, lo, hi, c in ((True, 1.5, 8, absent[0]), (False, 1.5, 15, absent[1])):
            mode = "O_DIRECT" if direct else "buffered"
            off = c * chunk + 5 * 4096
            rd = ReadInThread(m.path("p"), off, 4096, direct=direct)
            if not rd.join(30):
                fail(f"a {mode} read of absent data with the server down did not return "
                     "within 30 s (timeout=2)")
            if rd.error is None:
                fail(f"a {mode} read of absent data with the server down returned "
                     f"{len(rd.result)} bytes")
            if rd.error.errno != errno.EIO:
                fail(f"a {mode} read of absent data with the server down failed with "
                     f"{rd.error!r}, expected EIO")
            if not lo <= rd.elapsed <= hi:
                fail(f"{mode} read: EIO came after {rd.elapsed:.1f} s with timeout=2 "
                     f"(expected {lo}..{hi} s)")
            h.log(f"offline {mode} read of absent data: EIO after {rd.elapsed:.2f} s")
        # Present data still read fine after the failure.
        expect_equal("present data after EIO", h.pread_all(m.path("p"), r_off, r_len), first)


def test_answered_reads_are_stored_before_unmount():
    """A cold read is answered from the fetch buffer and its chunk stored in
    the background: unmounting right after such reads must still leave
    every fetched chunk, whole, in the image and marked present.  (Stores
    take about a millisecond, so most are done before the unmount: this
    catches lost or partial stores, and a lost queue only sometimes.)"""
    t = template("persist.img")
    chunk = MiB
    picks = list(range(0, t.size // chunk, 2))
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "p", ng.url(t.name), chunk_size="1M")
        with h.Mount(ws(), img, opts=("stream=manual", "readahead=0")) as m:
            fd = os.open(m.path("p"), os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                for c in picks:
                    off = c * chunk + 8192
                    n = os.preadv(fd, [buf], off)
                    expect_equal(f"cold read at {off}", buf[:n], t.read(off, 4096))
            finally:
                os.close(fd)
            # no pause: unmount while stores may still be queued
    with open(os.path.join(img, "p.img"), "rb") as f:
        for c in picks:
            f.seek(c * chunk)
            expect_equal(f"chunk {c} of the local image after unmount", f.read(chunk),
                         t.read(c * chunk, chunk))
    # Offline, the chunks must read as present (no fetch possible).
    with h.Mount(ws(), img, opts=("stream=manual", "timeout=1"), allow=OFFLINE_ERRORS) as m:
        for c in picks:
            expect_equal(f"chunk {c} offline", h.pread_all(m.path("p"), c * chunk, chunk),
                         t.read(c * chunk, chunk))


def _sequential_reads_in_chunk3(readahead, n=8):
    """n sequential O_DIRECT 64 KiB reads from the start of chunk 3 of a
    stream=manual mount; returns (template, fetched ranges)."""
    t = template("manual.img")
    chunk = MiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "m", ng.url(t.name), chunk_size="1M")
        ng.mark()
        with h.Mount(ws(), img, opts=("stream=manual", f"readahead={readahead}")) as m:
            off, piece = 3 * MiB, 64 * KiB
            fd = os.open(m.path("m"), os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, piece)
                for k in range(n):
                    got = os.preadv(fd, [buf], off + k * piece)
                    expect_equal(f"O_DIRECT read at {off + k * piece}", buf[:got],
                                 t.read(off + k * piece, piece))
            finally:
                os.close(fd)
            time.sleep(1)  # give any background prefetch time to show
            recs = ng.records()
        rs = check_fetches(recs, chunk, t.size)
        if h.overlapping(rs):
            fail(f"a chunk was fetched twice: {rs}")
    return t, rs


def test_manual_mode_fetches_only_demanded_chunks():
    # Contract: with stream=manual and readahead=0 only demand reads
    # fetch, and a read fetches only the chunks it covers.  O_DIRECT
    # sequential reads keep the kernel's own read-ahead out of the picture.
    t, rs = _sequential_reads_in_chunk3("0")
    outside = [(a, b) for a, b in rs if a < 3 * MiB or b >= 4 * MiB]
    if outside:
        fail(f"stream=manual,readahead=0: 8 sequential 64 KiB reads inside chunk 3 also fetched "
             f"{sum(b - a + 1 for a, b in outside)} bytes outside it: {outside}")


def test_readahead_fetches_ahead_of_a_sequential_reader():
    # With read-ahead, a reader that goes on sequentially across two
    # chunks (3 to 5.5 MiB) has the next ones fetched in the background
    # (6 and 7: the window grows with the distance read), nothing before.
    t, rs = _sequential_reads_in_chunk3("4M", n=40)
    if not h.covered(rs, 3 * MiB, 8 * MiB - 1):
        fail(f"read-ahead after 2.5 MiB of sequential reads did not fetch chunks 6-7: {rs}")
    if any(a < 3 * MiB for a, b in rs):
        fail(f"read-ahead fetched chunks before the reader: {rs}")


def test_readahead_ignores_one_large_read():
    # One 512 KiB read arrives as several FUSE reads; that is no
    # sequential reader, and read-ahead must not fetch anything for it.
    t, rs = _sequential_reads_in_chunk3("32M", n=8)
    if [(a, b) for a, b in rs if a < 3 * MiB or b >= 4 * MiB]:
        fail(f"read-ahead fetched beyond chunk 3 for one short run of reads: {rs}")


def test_connections_are_reused():
    # Many chunk requests travel over at most `connections` keep-alive
    # connections (nginx numbers each connection in its access log).
    t = template("whole.img")
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "c", ng.url(t.name), chunk_size="64K")
        ng.mark()
        with h.Mount(ws(), img, opts=("stream=auto", "connections=2")) as m:
            deadline = time.monotonic() + 60
            while os.getxattr(m.path("c"), "user.streamfs.state") != b"complete":
                if time.monotonic() > deadline:
                    fail("streaming did not complete")
                time.sleep(0.05)
            expect_equal("streamed disk", h.pread_all(m.path("c"), 0, t.size), t.read())
        recs = ng.records(uri="/" + t.name)
        conns = {r.conn for r in recs}
        h.log(f"{len(recs)} requests over {len(conns)} connections")
        if len(recs) < 5 or len(conns) > 2:
            fail(f"{len(recs)} requests used {len(conns)} connections, expected at most 2")


def test_remount_whole_read_fetches_only_absent():
    t = template("whole.img")
    chunk = 64 * KiB
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "w", ng.url(t.name), chunk_size="64K")
    ng.mark()
    with h.Mount(ws(), img) as m:
        for off, length in ((100, 1000), (2 * MiB + 3 * chunk + 5, 200000), (t.size - 10, 10)):
            expect_equal(f"read at {off}", h.pread_all(m.path("w"), off, length),
                         t.read(off, length))
        ng.records()
    before = check_fetches(ng.records(), chunk, t.size)
    if h.overlapping(before):
        fail(f"first mount fetched a chunk twice: {before}")
    port = ng.port
    ng.stop()
    ng = h.Nginx(ws(), port=port).start()
    with h.Mount(ws(), img) as m:
        expect_cmp(m.path("w"), t)
    after = check_fetches(ng.records(), chunk, t.size)
    problems = []
    if h.overlapping(after):
        problems.append(f"chunks fetched twice after remount: {h.overlapping(after)}")
    if h.overlapping(before + after):
        problems.append("present chunks fetched again after remount: "
                        f"{h.overlapping(before + after)}")
    if not h.covered(before + after, 0, t.size - 1):
        problems.append("the logs do not account for every byte of the disk")
    want = t.size - sum(b - a + 1 for a, b in before)
    got = sum(b - a + 1 for a, b in after)
    if got != want:
        problems.append(f"after remount fetched {got} bytes, absent were {want}")
    if problems:
        fail("; ".join(problems) + f"\nbefore: {before}\nafter: {after}")
    h.log(f"whole read after remount: {len(after)} request(s), {got} bytes "
          f"(present before: {t.size - want} bytes)")
    ng.stop()


# ---------------------------------------------------------------------------
# streamfsctl add
# ---------------------------------------------------------------------------

def test_add_bad_inputs():
    t = template("small.img")
    with h.Nginx(ws()) as ng:
        img = image_dir()
        good = ng.url(t.name)
        # A taken name: the original must survive untouched.
        h.ctl_add(img, "taken", good)
        taken_meta = os.path.join(img, "taken.meta")
        taken_img = os.path.join(img, "taken.img")
        taken_state = (h.sha256_file(taken_meta), h.sha256_file(taken_img))
        closed = h.ClosedPort()
        ro = ws().mkdir("readonly", unique=True)
        how = h.make_unwritable(ro)
        h.log(f"unwritable directory by {how}")
        missing_dir = os.path.join(ws().root, "no-such-dir", "deeper")
        cases = [
            ("404", [img, "n404", ng.url("missing.img")]),
            ("connection refused", [img, "nrefused", f"http://127.0.0.1:{closed.port}/x.img"]),
            ("ftp scheme", [img, "nftp", f"ftp://127.0.0.1:{ng.port}/{t.name}"]),
            ("not a URL", [img, "nurl", "not-a-url"]),
            ("empty host", [img, "nhost", "http:///small.img"]),
            ("name .hidden", [img, ".hidden", good]),
            ("name a/b", [img, "a/b", good]),
            ("name 300 chars", [img, "x" * 300, good]),
            ("empty name", [img, "", good]),
            ("name with space", [img, "bad name", good]),
            ("name taken", [img, "taken", good]),
            ("name taken, other URL", [img, "taken", ng.url("one.img")]),
            ("unwritable directory", [ro, "nro", good]),
            ("nonexistent directory", [missing_dir, "nmissing", good]),
            ("chunk size 3M", [img, "ncs3m", good, "--chunk-size", "3M"]),
            ("chunk size 32K", [img, "ncs32k", good, "--chunk-size", "32K"]),
            ("chunk size 32M", [img, "ncs32m", good, "--chunk-size", "32M"]),
            ("chunk size abc", [img, "ncsabc", good, "--chunk-size", "abc"]),
            ("chunk size 0", [img, "ncs0", good, "--chunk-size", "0"]),
        ]
        template("one.img")
        problems = []
        for what, args in cases:
            d = args[0]
            before = h.listdir_set(d) if os.path.isdir(d) else None
            rc, out, err = h.ctl("add", *args)
            try:
                line = expect_one_line_error(f"add ({what})", rc, err)
                h.log(f"add ({what}): rc {rc}: {line}")
            except AssertionError as e:
                problems.append(str(e))
            after = h.listdir_set(d) if os.path.isdir(d) else None
            if before != after:
                problems.append(f"add ({what}) changed {d}: {sorted(before or [])} -> "
                                f"{sorted(after or [])}")
        if os.path.exists(os.path.dirname(missing_dir)):
            problems.append(f"add created {os.path.dirname(missing_dir)}")
        if (h.sha256_file(taken_meta), h.sha256_file(taken_img)) != taken_state:
            problems.append("a refused add modified the existing disk 'taken'")
        # Valid chunk sizes at both ends are accepted.
        for cs in ("64K", "16M"):
            rc, out, err = h.ctl("add", img, f"cs{cs}", good, "--chunk-size", cs)
            if rc != 0:
                problems.append(f"add --chunk-size {cs} refused: {err.strip()}")
        if problems:
            fail("\n".join(problems))


def test_add_refuses_range_ignoring_server():
    t = template("odd3m.img")
    with h.RangeIgnoringServer(ws()) as srv:
        img = image_dir()
        before = h.listdir_set(img)
        rc, out, err = h.ctl("add", img, "norange", srv.url(t.name))
        line = expect_one_line_error("add from a server that ignores Range", rc, err)
        if not re.search(r"(?i)range", line):
            fail(f"the message does not say that ranges are not supported: {line!r}")
        if h.listdir_set(img) != before:
            fail(f"add left files behind: {sorted(h.listdir_set(img) - before)}")
        probes = [r for r in srv.requests() if not r.endswith('""')]
        if not probes:
            fail(f"add did not probe with a Range request: {srv.requests()}")
        h.log(f"refused: {line}")


def test_file_url_template():
    t = template("odd3m.img")
    img = image_dir()
    h.ctl_add(img, "viafile", "file://" + t.path, chunk_size="64K")
    before = h.listdir_set(img)
    rc, out, err = h.ctl("add", img, "nofile", "file://" + t.path + ".missing")
    expect_one_line_error("add of a missing file:// template", rc, err)
    if h.listdir_set(img) != before:
        fail("a failed file:// add left files behind")
    with h.Mount(ws(), img) as m:
        expect_cmp(m.path("viafile"), t)


# ---------------------------------------------------------------------------
# Mount-time errors
# ---------------------------------------------------------------------------

def test_mount_missing_image_dir():
    missing = os.path.join(ws().root, "no-such-images")
    for fg in (["-f"], []):
        mnt = ws().mkdir("mnt-missing", unique=True)
        rc, err = h.run_daemon_expect_failure([*fg, "-o", "stream=manual", missing, mnt])
        line = expect_one_line_error(f"streamfs {' '.join(fg)} with a missing IMAGE_DIR", rc, err)
        if "no-such-images" not in line:
            fail(f"the message does not name the directory: {line!r}")
        h.log(f"missing IMAGE_DIR ({'-f' if fg else 'daemon'}): rc {rc}: {line}")


def test_bad_mount_options_refused():
    t = template("small.img")
    img = image_dir()
    h.ctl_add(img, "s", "file://" + t.path)
    before = {n: h.sha256_file(os.path.join(img, n)) for n in h.listdir_set(img)}
    for opt in ("commit=3601", "commit=-1", "commit=0", "commit=", "connections=65", "readahead=65M", "chunk_size=3M",
                "stream=sometimes", "speed=fast", "debug=nosuch"):
        mnt = ws().mkdir("mnt-badopt", unique=True)
        rc, err = h.run_daemon_expect_failure(["-f", "-o", "stream=manual," + opt, img, mnt])
        line = expect_one_line_error(f"streamfs -o {opt}", rc, err)
        if opt not in line:
            fail(f"the message for -o {opt} does not name the option: {line!r}")
        h.log(f"-o {opt}: {line}")
    after = {n: h.sha256_file(os.path.join(img, n)) for n in h.listdir_set(img)}
    if after != before:
        fail("a refused mount changed the image directory")
    with h.Mount(ws(), img, opts=("stream=manual", "commit=3600")) as m:
        expect_cmp(m.path("s"), t)


def test_second_mount_refused():
    t = template("small.img")
    img = image_dir()
    h.ctl_add(img, "s", "file://" + t.path)
    link = os.path.join(ws().root, "images-link")
    os.symlink(img, link)
    with h.Mount(ws(), img) as m:
        for d in (img, link):
            mnt2 = ws().mkdir("mnt-second", unique=True)
            rc, err = h.run_daemon_expect_failure(["-f", "-o", "stream=manual", d, mnt2])
            line = expect_one_line_error(f"second mount of {d}", rc, err)
            h.log(f"second mount via {d}: rc {rc}: {line}")
        expect_cmp(m.path("s"), t)


def test_offline_add_into_mounted_dir_refused():
    # SPEC: an offline `streamfsctl add` into a mounted IMAGE_DIR is
    # refused, never allowed to write beside the daemon.
    t = template("small.img")
    img = image_dir()
    h.ctl_add(img, "s", "file://" + t.path)
    with h.Mount(ws(), img):
        before = h.listdir_set(img)
        rc, out, err = h.ctl("add", img, "beside", "file://" + t.path)
        expect_one_line_error("offline add into a mounted IMAGE_DIR", rc, err)
        if h.listdir_set(img) != before:
            fail(f"offline add wrote into a mounted IMAGE_DIR: "
                 f"{sorted(h.listdir_set(img) - before)}")


META_MAGIC, META_SLOT, crc32c = h.META_MAGIC, h.META_SLOT, h.crc32c


def header_slots(buf):
    """Offsets of the header slots holding the magic (format in
    cache/cache_i.h: two 4 KiB slots at 0 and 4096)."""
    slots = [o for o in (0, META_SLOT) if buf[o:o + 8] == META_MAGIC]
    if 0 not in slots:
        fail("NAME.meta does not start with STRMFSMD: metadata format changed, update the test")
    return slots


def corrupt_magic(path):
    with open(path, "r+b") as f:
        buf = f.read()
        for o in header_slots(buf):
            f.seek(o)
            f.write(b"XXXXXXXX")


def patch_headers(path, patch):
    """Calls patch(buf, offset) on every header slot of NAME.meta, then
    reseals each slot's checksum."""
    with open(path, "r+b") as f:
        buf = bytearray(f.read())
        for o in header_slots(buf):
            hdr_len = int.from_bytes(buf[o + 12:o + 16], "little")
            patch(buf, o)
            buf[o + 56:o + 60] = bytes(4)
            crc = crc32c(bytes(buf[o:o + hdr_len]))
            buf[o + 56:o + 60] = crc.to_bytes(4, "little")
        f.seek(0)
        f.write(buf)


def set_version(path, version):
    def patch(buf, o):
        buf[o + 8:o + 12] = version.to_bytes(4, "little")
    patch_headers(path, patch)


def set_flag(path, flag):
    """A flag bit in every header slot: a newer streamfs's header, to this
    build."""
    def patch(buf, o):
        flags = int.from_bytes(buf[o + 36:o + 40], "little") | flag
        buf[o + 36:o + 40] = flags.to_bytes(4, "little")
    patch_headers(path, patch)


def test_corrupt_metadata_disk_not_served():
    t = template("small.img")
    t3 = template("odd3m.img")
    img = image_dir()
    bad = ("badmagic", "trunc", "badver", "newflag")
    for name in ("good",) + bad:
        h.ctl_add(img, name, "file://" + (t3.path if name == "good" else t.path))
    corrupt_magic(os.path.join(img, "badmagic.meta"))
    os.truncate(os.path.join(img, "trunc.meta"), 100)
    set_version(os.path.join(img, "badver.meta"), 99)
    set_flag(os.path.join(img, "newflag.meta"), 0x80000000)
    sums = {n: h.sha256_file(os.path.join(img, n + ".meta")) for n in bad}
    with h.Mount(ws(), img, allow=[r"badmagic|trunc|badver|newflag"]) as m:
        listing = h.listdir_set(m.mnt)
        if "good" not in listing:
            fail(f"the good disk is not served: {sorted(listing)}")
        served = set(bad) & listing
        if served:
            fail(f"disks with corrupt metadata are served: {sorted(served)}")
        for n in bad:
            if os.path.exists(m.path(n)):
                fail(f"{n} is reachable by path in the mount")
        expect_cmp(m.path("good"), t3)
        err = m.stderr()
        for n, why in (("badmagic", r"magic|not a streamfs"), ("trunc", r"truncat"),
                       ("badver", r"version 99"), ("newflag", r"flags 0x80000000.*newer")):
            lines = [l for l in err.splitlines() if n in l]
            if not lines:
                fail(f"stderr does not name the corrupt disk {n!r}:\n{err}")
            if not any(re.search(why, l, re.IGNORECASE) for l in lines):
                fail(f"stderr does not say why {n!r} is skipped (want /{why}/): {lines}")
            h.log(f"{n}: {lines[0]}")
    for n, s in sums.items():
        if h.sha256_file(os.path.join(img, n + ".meta")) != s:
            fail(f"mounting modified the corrupt metadata of {n}")


# ---------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------

def test_signals_and_fusermount_unmount_cleanly():
    t = template("small.img")
    img = image_dir()
    h.ctl_add(img, "s", "file://" + t.path)
    problems = []
    for how in ("SIGTERM", "SIGINT", "fusermount3 -u"):
        m = h.Mount(ws(), img).start()
        expect_equal("read before shutdown", h.pread_all(m.path("s"), 0, t.size), t.read())
        if how == "fusermount3 -u":
            h.run(["fusermount3", "-u", m.mnt], check=True)
        else:
            os.kill(m.pid, getattr(signal, how))
        rc = m.wait_exit(15)
        if rc is None:
            problems.append(f"{how}: streamfs did not exit within 15 s\n{m.stderr()}")
        elif h.is_mounted(m.mnt):
            problems.append(f"{how}: {m.mnt} still mounted after the daemon exited")
        elif rc != 0:
            problems.append(f"{how}: streamfs exited {rc}, expected 0; stderr:\n{m.stderr()}")
        else:
            h.log(f"{how}: unmounted, exit 0")
        try:
            m.stop(expect_rc=None)
        except AssertionError as e:
            problems.append(f"{how}: {e}")
    if problems:
        fail("\n".join(problems))


if __name__ == "__main__":
    h.main(globals())
