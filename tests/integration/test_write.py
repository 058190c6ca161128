# SPDX-License-Identifier: MIT
"""Write integration tests: writes through a real FUSE mount against nginx,
checked byte for byte against a model computed here (template overlaid with
the writes); fetch behaviour of partial and whole-chunk writes; persistence
across remounts without the server; readonly mounts and size changes; QEMU
(qemu-io) and a shared mmap as writers surviving kill -9 of the daemon;
writer threads racing the streamer; a full local disk (ENOSPC) while
streaming.

Run: python3 tests/integration/test_write.py [test_name...]
(meson: meson test -C build --suite integration -v)
"""

import errno
import hashlib
import mmap
import os
import pwd
import random
import re
import signal
import sys
import threading
import time

import harness as h
from harness import KiB, MiB, fail



ws = h.workspace


def template(kind):
    sizes = {
        "rw.img": 24 * MiB + 777,
        "cold.img": 8 * MiB,
        "keep.img": 6 * MiB + 4097,
        "ro.img": 3 * MiB + 5,
        "qw.img": 12 * MiB,
        "full.img": 96 * MiB,
        "race.img": 32 * MiB,
        "mmap.img": 4 * MiB + 100,
        "discard.img": 6 * MiB + 333,
        "meta.img": 8 * MiB,
    }
    return ws().template(kind, sizes[kind])


def image_dir():
    return ws().mkdir("images", unique=True)


# ---------------------------------------------------------------------------
# Local helpers
# ---------------------------------------------------------------------------

def first_diff(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expect_equal(what, got, want):
    if got != want:
        i = first_diff(got, want)
        fail(f"{what}: {len(got)} bytes differ from the expected {len(want)} "
             f"(first difference at byte {i})")


def read_file_all(path):
    return h.pread_all(path, 0, os.stat(path).st_size + 1)


def pread_direct(path, off, length):
    """Reads [off, off+length) through O_DIRECT in one aligned request (at
    most 128 KiB), so that no page-cache read-ahead and no sequential
    pattern makes the daemon fetch more than the chunks covered."""
    a = off // 4096 * 4096
    b = min(os.stat(path).st_size, -(-(off + length) // 4096) * 4096)
    n = -(-(b - a) // 4096) * 4096
    if n > 128 * KiB:
        fail(f"pread_direct of {n} bytes: split it")
    buf = mmap.mmap(-1, n)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], a)
    finally:
        os.close(fd)
    return bytes(buf[:got])[off - a:off - a + length]


def control(m, cmd):
    """Writes one command to MNT/.control; returns its reply.  Raises
    OSError when the daemon refuses the command."""
    e, reply = h.control_send(m.mnt, cmd + "\n")
    if e > 0:
        raise OSError(e, f"{cmd!r}: {os.strerror(e)}")
    return reply


xattr = h.xattr


def wait_state(path, want, timeout, bad=("error",)):
    """Polls user.streamfs.state until it is `want`; fails early on a state
    in `bad` (with user.streamfs.error) and on the timeout."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = xattr(path, "state")
        if state == want:
            return
        if state in bad:
            fail(f"{path}: state {state} while waiting for {want}: "
                 f"error={xattr(path, 'error')!r}")
        time.sleep(0.1)
    fail(f"{path}: state still {state!r} after {timeout} s (want {want}); "
         f"cached={xattr(path, 'cached')} error={xattr(path, 'error')!r}")


def crash(m):
    """kill -9 of the daemon, then `fusermount3 -u -z`; checks its stderr
    for sanitizer reports and unexpected error lines."""
    os.kill(m.pid, signal.SIGKILL)
    if m.wait_exit(15) is None:
        fail(f"streamfs pid {m.pid} survived SIGKILL for 15 s")
    h.run(["fusermount3", "-u", "-z", m.mnt], timeout=30)
    m.stop(check=True, expect_rc=-signal.SIGKILL)


def pwrite_all(fd, data, off):
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], off + done)
        if n <= 0:
            fail(f"pwrite at {off + done} wrote {n} bytes")
        done += n


def get_fetches(ng, uri):
    """Chunk GETs logged since the last mark, as inclusive ranges."""
    recs = ng.records(uri=uri)
    for r in recs:
        if r.method != "GET" or r.status != 206:
            fail(f"unexpected request from streamfs: {r!r}")
    return recs, h.ranges_of(recs)


def chunks_in(ranges, chunk):
    out = set()
    for a, b in ranges:
        out.update(range(a // chunk, b // chunk + 1))
    return out


# ---------------------------------------------------------------------------
# Random writes, then streaming: whole disk equals the model
# ---------------------------------------------------------------------------

def random_writes(rng, size, chunk, n):
    """(offset, length) pairs: inside one chunk, across a chunk boundary,
    covering several whole chunks with ragged edges, chunk-aligned whole
    chunks, the first and the last byte of the disk."""
    nchunks = (size + chunk - 1) // chunk
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:                      # inside one chunk, odd offset
            c = rng.randrange(nchunks - 1)
            ln = rng.randrange(1, chunk // 3)
            off = c * chunk + rng.randrange(1, chunk - ln)
        elif kind == 1:                    # spans a chunk boundary
            c = rng.randrange(1, nchunks - 1)
            off = c * chunk - rng.randrange(1, 9000)
            ln = rng.randrange(c * chunk - off + 1, c * chunk - off + 20000)
        elif kind == 2:                    # whole chunks with ragged edges
            c = rng.randrange(1, nchunks - 5)
            off = c * chunk - rng.randrange(1, 5000)
            ln = rng.randrange(2, 4) * chunk + rng.randrange(2, 7000)
        elif kind == 3:                    # aligned whole chunks
            c = rng.randrange(nchunks - 3)
            off, ln = c * chunk, rng.randrange(1, 3) * chunk
        else:                              # small odd write anywhere
            off = rng.randrange(size - 600)
            ln = rng.randrange(1, 600)
        out.append((off, ln))
    out += [(0, 1), (size - 5000, 5000), (size - 1, 1)]
    return out


def write_and_check(fd, path, rng, writes, want, fsync_every):
    for k, (off, ln) in enumerate(writes):
        data = rng.randbytes(ln)
        pwrite_all(fd, data, off)
        want[off:off + ln] = data
        if k % fsync_every == 0:
            (os.fdatasync if k % 2 else os.fsync)(fd)
        # Read back both edges (O_DIRECT, small): the bytes beside the
        # write must still be the template's or earlier writes'.
        for e in sorted({off, off + ln}):
            a, b = max(0, e - 300), min(len(want), e + 300)
            expect_equal(f"read back at {a} around write {k} ({off}+{ln})",
                         pread_direct(path, a, b - a), bytes(want[a:b]))


def test_random_writes_then_stream():
    t = template("rw.img")
    chunk = 256 * KiB
    rng = random.Random(1234)
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "rw", ng.url(t.name), chunk_size="256K")
        want = bytearray(t.read())
        with h.Mount(ws(), img) as m:
            path = m.path("rw")
            fd = os.open(path, os.O_RDWR)
            try:
                writes = random_writes(rng, t.size, chunk, 30)
                write_and_check(fd, path, rng, writes, want, 7)
                before = int(xattr(path, "cached"))
                h.log(f"{len(writes)} writes, {before} of {t.size} bytes cached "
                      "before streaming")
                if before > t.size * 3 // 4:
                    fail(f"{before} bytes cached after {len(writes)} writes: "
                         "the streaming part would test little")
                # More writes while the streamer runs (throttled so that
                # it is still running).
                control(m, "speed rw 6M")
                control(m, "start rw")
                writes = random_writes(rng, t.size, chunk, 25)
                write_and_check(fd, path, rng, writes, want, 5)
                state = xattr(path, "state")
                if state != "streaming":
                    h.log(f"state after the writes during streaming: {state}")
            finally:
                os.close(fd)
            control(m, "speed rw 0")
            wait_state(path, "complete", 120)
            got = read_file_all(path)
            expect_equal("whole disk after streaming", got, bytes(want))
        h.log("unmounted; comparing the local image")
        got = read_file_all(os.path.join(img, "rw.img"))
        expect_equal("rw.img in the image directory", got, bytes(want))


def race_plan(rng, nchunks, chunk, nthreads):
    """Disjoint writes for nthreads writers, per group of 8 chunks: a whole
    chunk; one chunk written in quarters by every writer; one untouched;
    a ragged write across a boundary; a ragged write over three chunks
    (partial, whole, partial).  Returns (per-thread lists, untouched chunks)."""
    plans = [[] for _ in range(nthreads)]
    untouched = []
    q = chunk // nthreads
    for g in range(nchunks // 8):
        c = g * 8
        plans[rng.randrange(nthreads)].append((c * chunk, chunk))
        for t in range(nthreads):
            plans[t].append(((c + 1) * chunk + t * q + 1, q - 2))
        untouched.append(c + 2)
        plans[rng.randrange(nthreads)].append(((c + 3) * chunk + 777, 2 * chunk - 2 * 777))
        plans[rng.randrange(nthreads)].append(((c + 5) * chunk + 99, 3 * chunk - 2 * 99))
    for p in plans:
        rng.shuffle(p)
    return plans, untouched


def test_concurrent_writers_race_streamer():
    t = template("race.img")
    chunk = 64 * KiB
    nchunks = t.size // chunk
    tbytes = t.read()
    with h.Nginx(ws()) as ng:
        for it in range(3):
            rng = random.Random(f"race{it}")
            img = image_dir()
            h.ctl_add(img, "race", ng.url(t.name), chunk_size="64K")
            plans, untouched = race_plan(rng, nchunks, chunk, 4)
            want = bytearray(tbytes)
            datas = []
            for plan in plans:
                d = [rng.randbytes(ln) for _, ln in plan]
                datas.append(d)
                for (off, ln), b in zip(plan, d):
                    want[off:off + ln] = b
            errors = []
            with h.Mount(ws(), img, opts=("stream=manual", "connections=4")) as m:
                path = m.path("race")
                barrier = threading.Barrier(6)

                def writer(i):
                    try:
                        fd = os.open(path, os.O_RDWR)
                        try:
                            barrier.wait(30)
                            for k, ((off, ln), b) in enumerate(zip(plans[i], datas[i])):
                                pwrite_all(fd, b, off)
                                if k % 16 == 15:
                                    os.fdatasync(fd)
                        finally:
                            os.close(fd)
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(f"writer {i}: {e!r}")

                def reader():
                    try:
                        barrier.wait(30)
                        for c in rng.sample(untouched, len(untouched)):
                            off = c * chunk + 4096
                            got = pread_direct(path, off, 8192)
                            if got != tbytes[off:off + 8192]:
                                errors.append(f"reader: wrong bytes in untouched chunk {c}")
                                return
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"reader: {e!r}")

                threads = [threading.Thread(target=writer, args=(i,), daemon=True)
                           for i in range(4)]
                threads.append(threading.Thread(target=reader, daemon=True))
                for th in threads:
                    th.start()
                barrier.wait(30)
                control(m, "start race")
                for th in threads:
                    th.join(120)
                if any(th.is_alive() for th in threads):
                    fail(f"iteration {it}: writers/reader still blocked after 120 s "
                         f"(state {xattr(path, 'state')})")
                if errors:
                    fail(f"iteration {it}: " + "; ".join(errors))
                wait_state(path, "complete", 120)
                expect_equal(f"iteration {it}: whole disk", read_file_all(path), bytes(want))
            expect_equal(f"iteration {it}: race.img after unmount",
                         read_file_all(os.path.join(img, "race.img")), bytes(want))
            h.log(f"iteration {it}: {sum(map(len, plans))} writes by 4 threads raced the "
                  "streamer and a reader: disk matches")


def test_mmap_shared_write():
    t = template("mmap.img")
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "mm", ng.url(t.name), chunk_size="64K")
        want = bytearray(t.read())
        with h.Mount(ws(), img) as m:
            path = m.path("mm")
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, t.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                try:
                    for off, ln in ((5, 100), (MiB - 50, 100), (2 * MiB, 64 * KiB),
                                    (t.size - 30, 30)):
                        data = os.urandom(ln)
                        mm[off:off + ln] = data
                        want[off:off + ln] = data
                    mm.flush()
                finally:
                    mm.close()
            finally:
                os.close(fd)
            crash(m)
        with h.Mount(ws(), img) as m:
            control(m, "start mm")
            wait_state(m.path("mm"), "complete", 60)
            expect_equal("disk written through a shared mapping, after msync and kill -9",
                         read_file_all(m.path("mm")), bytes(want))


# ---------------------------------------------------------------------------
# What writes fetch
# ---------------------------------------------------------------------------

def test_whole_chunk_writes_fetch_nothing():
    t = template("cold.img")
    chunk = 256 * KiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "cold", ng.url(t.name), chunk_size="256K")
        want = bytearray(t.read())
        with h.Mount(ws(), img) as m:
            path = m.path("cold")
            fd = os.open(path, os.O_RDWR)
            try:
                # Aligned, chunk-sized writes on cold chunks: no GET.
                ng.mark()
                for c, n in ((3, 1), (10, 3), (31, 1)):
                    data = bytes([c]) * (n * chunk)
                    pwrite_all(fd, data, c * chunk)
                    want[c * chunk:(c + n) * chunk] = data
                os.fsync(fd)
                recs, rs = get_fetches(ng, t.name)
                if recs:
                    fail(f"whole-chunk writes to cold chunks fetched: {recs}")
                # Reading them back fetches none of them (read-ahead may
                # fetch the chunks after them).
                written = {3, 10, 11, 12, 31}
                for c, n in ((3, 1), (10, 3), (31, 1)):
                    for k in range(n):
                        off = (c + k) * chunk
                        got = pread_direct(path, off, 128 * KiB)
                        expect_equal(f"chunk {c + k} read back", got,
                                     bytes(want[off:off + 128 * KiB]))
                recs, rs = get_fetches(ng, t.name)
                if chunks_in(rs, chunk) & written:
                    fail(f"reading written whole chunks fetched them: {recs}")

                # A partial write to a cold chunk fetches exactly that chunk.
                for c, off, ln in ((5, 5 * chunk + 1001, 3000), (20, 21 * chunk - 7, 7),
                                   (22, 22 * chunk, 4096)):
                    ng.mark()
                    data = b"\x5a" * ln
                    pwrite_all(fd, data, off)
                    want[off:off + ln] = data
                    recs, rs = get_fetches(ng, t.name)
                    if rs != [(c * chunk, (c + 1) * chunk - 1)]:
                        fail(f"a {ln}-byte write at {off} (chunk {c}) made requests {recs}, "
                             f"expected exactly one GET of chunk {c}")
                    a = max(c * chunk, off - 1000)
                    expect_equal(f"chunk {c} around a partial write",
                                 pread_direct(path, a, 8192), bytes(want[a:a + 8192]))

                # Ragged edges around whole chunks: only the two edge chunks.
                ng.mark()
                off, ln = 14 * chunk - 100, 2 * chunk + 300
                data = b"\xc3" * ln
                pwrite_all(fd, data, off)
                want[off:off + ln] = data
                recs, rs = get_fetches(ng, t.name)
                got_chunks = sorted(chunks_in(rs, chunk))
                if got_chunks != [13, 16] or h.overlapping(rs):
                    fail(f"a write over chunks 13(part)..16(part) fetched chunks {got_chunks}, "
                         f"expected [13, 16]: {recs}")
                os.fsync(fd)
            finally:
                os.close(fd)
            expect_equal("whole disk", read_file_all(path), bytes(want))


def _fallocate(fd, mode, off, length):
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def test_discard_reads_zeros_and_fetches_only_edges():
    """fallocate PUNCH_HOLE (a VM's discard) and ZERO_RANGE: the range reads
    as zeros at once and after remount with no server; whole chunks need no
    fetch, ragged edges fetch just their chunk; the rest is the template."""
    t = template("discard.img")
    chunk = 256 * KiB
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "dz", ng.url(t.name), chunk_size="256K")
        want = bytearray(t.read())
        m = h.Mount(ws(), img).start()
        path = m.path("dz")
        fd = os.open(path, os.O_RDWR)
        try:
            ng.mark()
            off, ln = 3 * chunk + 1000, 4 * chunk  # chunks 3 and 7 partial, 4-6 whole
            _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
            want[off:off + ln] = bytes(ln)
            recs, rs = get_fetches(ng, t.name)
            if sorted(chunks_in(rs, chunk)) != [3, 7]:
                fail(f"discard over chunks 3(part)..7(part) fetched {recs}, expected chunks 3, 7")
            off2, ln2 = 12 * chunk, chunk + 5  # chunk 12 whole, 13 partial
            _fallocate(fd, FALLOC_FL_ZERO_RANGE, off2, ln2)
            want[off2:off2 + ln2] = bytes(ln2)
            for a in range(3 * chunk, 15 * chunk, 128 * KiB):
                expect_equal(f"after discard, at {a}", pread_direct(path, a, 128 * KiB),
                             bytes(want[a:a + 128 * KiB]))
            # The disk's size never changes.
            try:
                _fallocate(fd, 0, t.size - 10, 100)
                fail("fallocate past the end succeeded")
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL, errno.EFBIG):
                    fail(f"fallocate past the end: {e}")
            os.fsync(fd)
        finally:
            os.close(fd)
        control(m, "start dz")
        wait_state(path, "complete", 60)
        m.stop()
    m2 = h.Mount(ws(), img).start()
    expect_equal("whole disk after remount, no server", read_file_all(m2.path("dz")), bytes(want))
    m2.stop()


def test_zero_chunks_read_as_zeros_until_written():
    """All-zero chunks are stored as holes and their reads answered with
    zeros: a zero chunk over leftovers of an interrupted write in the image
    reads as zeros (the leftovers are punched out), and a write into a zero
    chunk, present or absent, is read back at once and after remount."""
    chunk = 256 * KiB
    nchunks = 8  # even chunks random, odd ones all zero
    rng = random.Random("zero-chunks")
    data = b"".join(rng.randbytes(chunk) if i % 2 == 0 else bytes(chunk)
                    for i in range(nchunks))
    path_t = os.path.join(ws().www, "zeros.img")
    with open(path_t, "wb") as f:
        f.write(data)
    os.chmod(path_t, 0o644)
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "z", ng.url("zeros.img"), chunk_size="256K")
        image = os.path.join(img, "z.img")
        # Chunk 3 (absent, all zero) holds what a crash mid-write left.
        with open(image, "r+b") as f:
            f.seek(3 * chunk + 4096)
            f.write(b"leftover" * 512)
        want = bytearray(data)
        m = h.Mount(ws(), img, opts=("stream=manual",)).start()
        path = m.path("z")
        for rnd in ("cold", "present"):
            for a in range(0, 7 * chunk, 128 * KiB):
                expect_equal(f"{rnd} read at {a}", pread_direct(path, a, 128 * KiB),
                             bytes(want[a:a + 128 * KiB]))
        with open(image, "rb") as f:
            f.seek(3 * chunk)
            if f.read(chunk) != bytes(chunk):
                fail("the leftovers in chunk 3 are still in the image")
        fd = os.open(path, os.O_RDWR)
        try:
            for off in (5 * chunk + 8192, 7 * chunk + 100):  # present, absent
                os.pwrite(fd, b"written!" * 512, off)
                want[off:off + 4096] = b"written!" * 512
                a = off // (128 * KiB) * (128 * KiB)
                expect_equal(f"read after the write at {off}", pread_direct(path, a, 128 * KiB),
                             bytes(want[a:a + 128 * KiB]))
        finally:
            os.close(fd)
        m.stop()
    m2 = h.Mount(ws(), img).start()
    expect_equal("whole disk after remount, no server", read_file_all(m2.path("z")), bytes(want))
    m2.stop()


# ---------------------------------------------------------------------------
# Remount keeps writes and present chunks, with no server
# ---------------------------------------------------------------------------

OFFLINE_ERRORS = [r"(?i)connect|refused|fetch|timed? ?out|timeout|input/output|\bEIO\b|"
                  r"unreachable|network|http|curl|range"]


def test_remount_keeps_writes_offline():
    t = template("keep.img")
    chunk = 64 * KiB
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "keep", ng.url(t.name), chunk_size="64K")
    want = bytearray(t.read())
    regions = []      # (off, len) that must read without the server
    with h.Mount(ws(), img) as m:
        path = m.path("keep")
        fd = os.open(path, os.O_RDWR)
        try:
            for off, ln in ((100, 5000), (2 * chunk, 3 * chunk), (10 * chunk - 10, 20),
                            (t.size - 4097, 4097)):
                data = os.urandom(ln)
                pwrite_all(fd, data, off)
                want[off:off + ln] = data
                first, last = off // chunk * chunk, min(t.size, (off + ln - 1) // chunk
                                                        * chunk + chunk)
                regions.append((first, last - first))
            # A read makes chunks present too.
            r_off, r_len = 3 * MiB + 123, 100 * KiB
            expect_equal("read before remount", pread_direct(path, r_off, r_len),
                         bytes(want[r_off:r_off + r_len]))
            regions.append((r_off, r_len))
        finally:
            os.close(fd)
        ng.records()  # let in-flight requests finish
        cached = int(xattr(path, "cached"))
    ng.stop()
    with h.Mount(ws(), img, opts=("stream=manual", "timeout=2"), allow=OFFLINE_ERRORS) as m:
        path = m.path("keep")
        if int(xattr(path, "cached")) != cached:
            fail(f"cached was {cached} before unmount, {xattr(path, 'cached')} after remount")
        for off, ln in regions:
            expect_equal(f"{ln} bytes at {off} with nginx stopped",
                         h.pread_all(path, off, ln), bytes(want[off:off + ln]))
        # An absent chunk fails (EIO) rather than returning anything.
        try:
            data = h.pread_all(path, 5 * MiB + 1, 10)
            fail(f"an absent chunk read {len(data)} bytes with the server stopped")
        except OSError as e:
            if e.errno != errno.EIO:
                fail(f"absent chunk with the server stopped: {e!r}, expected EIO")


# ---------------------------------------------------------------------------
# readonly, size changes
# ---------------------------------------------------------------------------

def expect_errno(what, fn, allowed):
    try:
        fn()
    except OSError as e:
        if e.errno not in allowed:
            fail(f"{what}: {e!r}, expected one of "
                 f"{', '.join(errno.errorcode[x] for x in allowed)}")
        return e.errno
    fail(f"{what} succeeded, expected "
         f"{' or '.join(errno.errorcode[x] for x in allowed)}")


def test_readonly_and_size_changes():
    t = template("ro.img")
    img = image_dir()
    with h.Nginx(ws()) as ng:
        h.ctl_add(img, "ro", ng.url(t.name), chunk_size="64K")
        with h.Mount(ws(), img, opts=("stream=manual", "readonly")) as m:
            path = m.path("ro")
            for flags, name in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"),
                                (os.O_RDWR | os.O_DIRECT, "O_RDWR|O_DIRECT")):
                expect_errno(f"readonly mount: open {name}", lambda f=flags: os.open(path, f),
                             (errno.EROFS,))
            # Size changes: EPERM (the SPEC's refusal of size changes); a
            # readonly mount may say EROFS first, which also refuses it.
            e = expect_errno("readonly mount: truncate to a smaller size",
                             lambda: os.truncate(path, 4096),
                             (errno.EPERM, errno.EINVAL, errno.EROFS))
            h.log(f"readonly truncate: {errno.errorcode[e]}")
            expect_errno("readonly mount: open O_WRONLY|O_TRUNC",
                         lambda: os.open(path, os.O_WRONLY | os.O_TRUNC),
                         (errno.EROFS, errno.EPERM))
            if os.stat(path).st_size != t.size:
                fail(f"size changed to {os.stat(path).st_size} on a readonly mount")
            expect_equal("readonly mount: read", h.pread_all(path, 0, t.size), t.read())
        with h.Mount(ws(), img) as m:
            path = m.path("ro")
            for size in (0, t.size - 1, t.size + 1, t.size + MiB):
                expect_errno(f"truncate to {size}", lambda s=size: os.truncate(path, s),
                             (errno.EPERM, errno.EINVAL))
            fd = os.open(path, os.O_RDWR)
            try:
                for size in (4096, t.size + 4096):
                    expect_errno(f"ftruncate to {size}", lambda s=size: os.ftruncate(fd, s),
                                 (errno.EPERM, errno.EINVAL))
                # Same size: nothing changes, nothing to refuse.
                try:
                    os.ftruncate(fd, t.size)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EINVAL):
                        fail(f"ftruncate to the same size: {e!r}")
                # Growing by fallocate (glibc falls back to writing past
                # the end) or by writes past the end is refused too.
                expect_errno("posix_fallocate beyond the end",
                             lambda: os.posix_fallocate(fd, t.size, MiB),
                             (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP, errno.EFBIG,
                              errno.ENOSPC))
                expect_errno("pwrite past the end",
                             lambda: os.pwrite(fd, b"x" * 100, t.size + 4096),
                             (errno.EPERM, errno.EINVAL, errno.EFBIG, errno.ENOSPC))
                n = os.pwrite(fd, b"\xee" * 100, t.size - 10)
                if n != 10:
                    fail(f"a 100-byte pwrite 10 bytes before the end wrote {n} bytes, "
                         "expected 10")
                os.pwrite(fd, t.read(t.size - 10, 10), t.size - 10)
            finally:
                os.close(fd)
            expect_errno("open O_WRONLY|O_TRUNC",
                         lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC)),
                         (errno.EPERM, errno.EINVAL))
            if os.stat(path).st_size != t.size:
                fail(f"size changed to {os.stat(path).st_size}, template {t.size}")
            expect_equal("data after refused size changes", h.pread_all(path, 0, t.size),
                         t.read())
        if os.stat(os.path.join(img, "ro.img")).st_size != t.size:
            fail("the local image's size changed")


def test_readonly_owner_sets_the_speed():
    """Under readonly the disk keeps its image's mode, as on a filesystem
    mounted read-only: the kernel asks write permission for user.*
    xattrs, so a mode without write bits kept the owner (not root) from
    setting user.streamfs.speed.  Opens for writing still fail with EROFS."""
    if os.geteuid() != 0 or not h.find_program("setpriv"):
        h.log("not root or no setpriv: skipped")
        return
    nobody = pwd.getpwnam("nobody").pw_uid
    as_nobody = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
    t = template("ro.img")
    img = image_dir()
    with h.Nginx(ws()) as ng:
        h.ctl_add(img, "ro", ng.url(t.name), chunk_size="64K")
        os.chown(os.path.join(img, "ro.img"), nobody, -1)
        with h.Mount(ws(), img, opts=("stream=manual", "readonly", "allow_other")) as m:
            path = m.path("ro")
            r = h.run(as_nobody + ["setfattr", "-n", "user.streamfs.speed", "-v", "12345", path])
            if r.returncode != 0:
                fail(f"the disk's owner cannot set user.streamfs.speed on a readonly "
                     f"mount: {r.stderr_text.strip()!r}")
            if xattr(path, "speed") != "12345":
                fail(f"user.streamfs.speed is {xattr(path, 'speed')!r} after setting 12345")
            st = os.stat(path)
            if st.st_uid != nobody or st.st_mode & 0o777 != 0o600:
                fail(f"readonly disk: owner {st.st_uid}, mode {st.st_mode & 0o777:o}; "
                     f"expected the image's: {nobody}, 600")
            r = h.run(as_nobody + [sys.executable, "-c",
                                   "import os, sys; os.open(sys.argv[1], os.O_RDWR)", path])
            if r.returncode == 0 or "Read-only file system" not in r.stderr_text:
                fail(f"the owner's open for writing on a readonly mount: rc {r.returncode}, "
                     f"{r.stderr_text.strip()[-200:]!r}; expected EROFS")
            expect_equal("readonly mount: read", h.pread_all(path, 0, t.size), t.read())


# ---------------------------------------------------------------------------
# QEMU as the writer, then kill -9
# ---------------------------------------------------------------------------

def qemu_io(path, cmds, extra=()):
    cmd = ["qemu-io", "-f", "raw", *extra]
    for c in cmds:
        cmd += ["-c", c]
    cmd.append(path)
    p = h.run(cmd, timeout=120)
    out = p.stdout_text + p.stderr_text
    if p.returncode != 0 or re.search(r"(?i)fail|error|mismatch", out):
        fail(f"{' '.join(cmd)}: rc {p.returncode}\n{out}")
    return out


def test_qemu_io_writes_survive_kill9():
    t = template("qw.img")
    chunk = MiB
    # (pattern, offset, length, qemu-io options): buffered writes at odd
    # places (within a chunk, across chunks, whole chunks), then O_DIRECT
    # (-n, and --cache=none) at 4 KiB-aligned places.
    writes = [
        (0xab, 12345, 1000, ()),
        (0xab, 2 * MiB - 777, 5000, ()),
        (0xab, 4 * MiB, 2 * MiB, ()),
        (0xcd, 7 * MiB + 4096, 8192, ("-n",)),
        (0xcd, 8 * MiB - 4096, 3 * 4096, ("-n",)),
        (0xce, 9 * MiB, MiB, ("--cache=none",)),
        (0xcf, 10 * MiB + 65536, 4096, ("--cache=none", "--aio=native")),
    ]
    with h.Nginx(ws()) as ng:
        img = image_dir()
        h.ctl_add(img, "qw", ng.url(t.name), chunk_size="1M")
        want = bytearray(t.read())
        m = h.Mount(ws(), img).start()
        path = m.path("qw")
        for pat, off, ln, extra in writes:
            qemu_io(path, [f"write -P {pat:#x} {off} {ln}", "flush"], extra)
            want[off:off + ln] = bytes([pat]) * ln
        crash(m)
        h.log("daemon killed with SIGKILL after qemu-io flush; remounting")
        with h.Mount(ws(), img) as m:
            path = m.path("qw")
            for pat, off, ln, extra in writes:
                out = qemu_io(path, [f"read -P {pat:#x} {off} {ln}"], extra)
                if f"read {ln}/{ln} bytes at offset {off}" not in out:
                    fail(f"qemu-io read -P {pat:#x} {off} {ln}: no full read reported:\n{out}")
            # The rest of each written chunk is the template's.
            for pat, off, ln, extra in writes:
                a = off // chunk * chunk
                b = min(t.size, (off + ln - 1) // chunk * chunk + chunk)
                expect_equal(f"chunks around the write at {off}", h.pread_all(path, a, b - a),
                             bytes(want[a:b]))


# ---------------------------------------------------------------------------
# ENOSPC while streaming
# ---------------------------------------------------------------------------

ENOSPC_ERRORS = [r"(?i)space|ENOSPC|cannot write|local image|save progress|streaming stopped"]


def small_fs_image_dir(name, size):
    """An image directory on a tmpfs of `size` (unmounted at the test's
    end); returns (tmpfs mount point, image directory)."""
    fsdir = ws().mkdir(name, unique=True)
    p = h.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", fsdir])
    if p.returncode != 0:
        fail(f"cannot mount a tmpfs: {p.stderr_text.strip()}")
    h.defer(lambda: h.run(["umount", "-l", fsdir]), "umount tmpfs")
    img = os.path.join(fsdir, "images")
    os.mkdir(img)
    return fsdir, img


def test_enospc_stops_streaming_then_resumes():
    t = template("full.img")
    fsdir, img = small_fs_image_dir("smallfs", "48M")
    with h.Nginx(ws()) as ng:
        h.ctl_add(img, "full", ng.url(t.name), chunk_size="1M")
        with h.Mount(ws(), img, allow=ENOSPC_ERRORS) as m:
            path = m.path("full")
            # Present before the disk fills: a read and a write.
            r_off, r_len = 10 * MiB + 5, 3 * MiB
            expect_equal("read before streaming", h.pread_all(path, r_off, r_len),
                         t.read(r_off, r_len))
            w_off, w_data = 50 * MiB + 99, os.urandom(70000)
            fd = os.open(path, os.O_RDWR)
            try:
                pwrite_all(fd, w_data, w_off)
                os.fsync(fd)
            finally:
                os.close(fd)
            want = bytearray(t.read())
            want[w_off:w_off + len(w_data)] = w_data

            control(m, "start full")
            wait_state(path, "error", 120, bad=("complete",))
            err = xattr(path, "error")
            h.log(f"state error: {err!r}")
            if not re.search(r"(?i)space|ENOSPC", err):
                fail(f"user.streamfs.error does not name the space problem: {err!r}")
            cached = int(xattr(path, "cached"))
            if cached >= t.size:
                fail(f"cached {cached} on a 48 MiB filesystem for a {t.size}-byte disk")
            time.sleep(1)
            if xattr(path, "state") != "error":
                fail(f"state went from error to {xattr(path, 'state')} without a start")
            # Data already present still reads correctly.
            expect_equal("present read after ENOSPC", h.pread_all(path, r_off, r_len),
                         bytes(want[r_off:r_off + r_len]))
            expect_equal("written data after ENOSPC",
                         h.pread_all(path, w_off, len(w_data)), w_data)
            # An absent read either fails or returns the right bytes.
            a_off = t.size - 3 * MiB
            try:
                got = h.pread_all(path, a_off, 4096)
                expect_equal("absent read on a full disk", got, bytes(want[a_off:a_off + 4096]))
            except OSError as e:
                h.log(f"absent read on a full filesystem: {e!r}")

            p = h.run(["mount", "-o", "remount,size=256M", fsdir])
            if p.returncode != 0:
                fail(f"cannot enlarge the tmpfs: {p.stderr_text.strip()}")
            control(m, "start full")
            wait_state(path, "complete", 120)
            if xattr(path, "error"):
                h.log(f"error after completion: {xattr(path, 'error')!r}")
            expect_equal("whole disk after resuming", read_file_all(path), bytes(want))
        got = hashlib.sha256(read_file_all(os.path.join(img, "full.img"))).hexdigest()
        if got != hashlib.sha256(bytes(want)).hexdigest():
            fail("full.img in the image directory differs from the expected disk")


def test_sync_on_a_full_filesystem_needs_no_metadata_block():
    """The metadata's blocks are allocated when the disk is added: with the
    image directory's filesystem full but for one chunk, a write of that
    whole chunk and its fsync succeed (recording it present takes no new
    block), and the chunk survives a remount."""
    t = template("meta.img")
    fsdir, img = small_fs_image_dir("metafs", "24M")
    h.ctl_add(img, "m", "file://" + t.path, chunk_size="1M")
    # Fill the filesystem, then free exactly one chunk's worth.
    filler = os.path.join(fsdir, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\xff" * MiB
        while True:
            try:
                if os.write(fd, block) == 0:
                    break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    size = os.path.getsize(filler)
    os.truncate(filler, size - MiB)
    data, off = os.urandom(MiB), 5 * MiB
    with h.Mount(ws(), img, allow=[r"(?i)space|save progress"]) as m:
        fd = os.open(m.path("m"), os.O_RDWR)
        try:
            pwrite_all(fd, data, off)
            os.fsync(fd)
        except OSError as e:
            fail(f"a whole-chunk write and fsync with one chunk free: {e!r}")
        finally:
            os.close(fd)
        if "save progress" in m.stderr():
            fail(f"progress could not be saved:\n{m.stderr()}")
    with h.Mount(ws(), img) as m:
        expect_equal("the written chunk after a remount", h.pread_all(m.path("m"), off, MiB),
                     data)
        if int(xattr(m.path("m"), "cached")) != MiB:
            fail(f"cached {xattr(m.path('m'), 'cached')} after the remount, expected {MiB}")


if __name__ == "__main__":
    h.main(globals())
