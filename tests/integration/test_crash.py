# SPDX-License-Identifier: MIT
"""Crash tests (slow-ish, under 3 minutes): kill -9 of the daemon while it
streams and while a writer writes, fsyncs and keeps writing, then remount.

The model: a kill -9 loses nothing that reached the local image's page
cache, but a chunk whose present-bit was not yet persisted is fetched again
from the template.  So after any crash every 4 KiB block must hold the
template's bytes or a value written to it, and a block written and then
synced must hold that value unless a later, unsynced write changed it (then
either is allowed).  After each crash the persisted present-bitmap is
checked against the local image directly: a present chunk holds only
allowed values.

Run: python3 tests/integration/test_crash.py [test_name...]
(meson: meson test -C build --suite integration -v)
"""

import errno
import mmap
import os
import platform
import random
import signal
import time

import harness as h
from harness import KiB, MiB, fail

BLOCK = 4096



ws = h.workspace


def image_dir():
    return ws().mkdir("images", unique=True)


# ---------------------------------------------------------------------------
# Local helpers
# ---------------------------------------------------------------------------

def expect_equal(what, got, want):
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
        fail(f"{what}: {len(got)} bytes differ from the expected {len(want)} "
             f"(first difference at byte {i})")


def pread_direct(path, off, length):
    """One O_DIRECT read of the 4 KiB-aligned span holding [off, off+length)
    (at most 128 KiB): no page-cache read-ahead, no sequential pattern."""
    a = off // BLOCK * BLOCK
    b = -(-(off + length) // BLOCK) * BLOCK
    if b - a > 128 * KiB:
        fail(f"pread_direct of {b - a} bytes: split it")
    buf = mmap.mmap(-1, b - a)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], a)
    finally:
        os.close(fd)
    return bytes(buf[:got])[off - a:off - a + length]


def read_file_all(path):
    return h.pread_all(path, 0, os.stat(path).st_size + 1)


def control(m, cmd, ok_errnos=()):
    """Writes one command to MNT/.control; returns its reply, or None when
    the write failed with an errno in ok_errnos."""
    fd = os.open(m.path(".control"), os.O_RDWR)
    try:
        try:
            os.write(fd, (cmd + "\n").encode())
        except OSError as e:
            if e.errno in ok_errnos:
                return None
            raise
        out = b""
        while True:
            b = os.read(fd, 65536)
            if not b:
                return out.decode(errors="replace")
            out += b
    finally:
        os.close(fd)


xattr = h.xattr


def wait_complete(path, timeout):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = xattr(path, "state")
        if state == "complete":
            return
        if state == "error":
            fail(f"{path}: state error: {xattr(path, 'error')!r}")
        time.sleep(0.1)
    fail(f"{path}: state {state!r} after {timeout} s; cached={xattr(path, 'cached')}")


def crash(m, fds=()):
    """kill -9 of the daemon, close of the writer's fds (their flush fails
    on the dead connection), `fusermount3 -u -z`, reap; checks its stderr
    for sanitizer reports and unexpected error lines."""
    os.kill(m.pid, signal.SIGKILL)
    if m.wait_exit(15) is None:
        fail(f"streamfs pid {m.pid} survived SIGKILL for 15 s")
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    p = h.run(["fusermount3", "-u", "-z", m.mnt], timeout=30)
    if p.returncode != 0 and h.is_mounted(m.mnt):
        fail(f"fusermount3 -u -z {m.mnt}: {p.stderr_text.strip()}")
    m.stop(check=True, expect_rc=-signal.SIGKILL)


# --- NAME.meta (format in cache/cache_i.h) ---

META_MAGIC, META_SLOT, crc32c = h.META_MAGIC, h.META_SLOT, h.crc32c
META_BITMAP_OFFSET, META_FLAG_COMPLETE = h.META_BITMAP_OFFSET, h.META_FLAG_COMPLETE


def read_meta(path):
    """Returns (header dict of the winning slot, present chunk set)."""
    with open(path, "rb") as f:
        buf = f.read()
    best = None
    for o in (0, META_SLOT):
        s = buf[o:o + META_SLOT]
        if s[:8] != META_MAGIC:
            continue
        hlen = int.from_bytes(s[12:16], "little")
        if not 64 <= hlen <= META_SLOT:
            continue
        stored = int.from_bytes(s[56:60], "little")
        if crc32c(s[:56] + bytes(4) + s[60:hlen]) != stored:
            continue
        hdr = {
            "version": int.from_bytes(s[8:12], "little"),
            "generation": int.from_bytes(s[16:24], "little"),
            "size": int.from_bytes(s[24:32], "little"),
            "chunk_size": int.from_bytes(s[32:36], "little"),
            "flags": int.from_bytes(s[36:40], "little"),
        }
        if best is None or hdr["generation"] > best["generation"]:
            best = hdr
    if best is None:
        fail(f"{path}: no valid header slot (format changed? update the test)")
    nchunks = -(-best["size"] // best["chunk_size"])
    bits = buf[META_BITMAP_OFFSET:META_BITMAP_OFFSET + (nchunks + 7) // 8]
    if len(bits) != (nchunks + 7) // 8:
        fail(f"{path}: bitmap truncated ({len(bits)} bytes for {nchunks} chunks)")
    present = {i for i in range(nchunks) if bits[i // 8] >> (i % 8) & 1}
    return best, present


# ---------------------------------------------------------------------------
# The model of what a crash may leave
# ---------------------------------------------------------------------------

class Model:
    """Per 4 KiB block: `allowed`, the values a crash may leave (absent
    key: only the template's), and `cur`, what a read returns now (absent
    key: the template's; None: unknown since a crash, one of allowed)."""

    def __init__(self, tbytes):
        self.t = tbytes
        self.allowed = {}
        self.cur = {}

    def tblock(self, b):
        return self.t[b * BLOCK:(b + 1) * BLOCK]

    def allowed_of(self, b):
        return self.allowed.get(b) or {self.tblock(b)}

    def learn(self, b, value, what):
        """A read of block b returned value: must be allowed; since a kill -9
        keeps the page cache and the bitmap read at mount, it stays."""
        if value not in self.allowed_of(b):
            fail(f"{what}: block {b} (offset {b * BLOCK}) holds a value that is neither "
                 "the template's nor one written to it "
                 f"({len(self.allowed_of(b))} allowed)")
        self.cur[b] = value
        if b in self.allowed:
            self.allowed[b] = {value}

    def unknown(self, b):
        return b in self.cur and self.cur[b] is None

    def write(self, off, data):
        first, last = off // BLOCK, (off + len(data) - 1) // BLOCK
        for b in range(first, last + 1):
            a = b * BLOCK
            lo, hi = max(off, a), min(off + len(data), a + BLOCK)
            if lo == a and hi == a + BLOCK:
                new = data[lo - off:hi - off]
            else:
                old = self.cur.get(b, self.tblock(b))
                assert old is not None, "read unknown edge blocks before writing"
                new = old[:lo - a] + data[lo - off:hi - off] + old[hi - a:]
            self.cur[b] = new
            self.allowed.setdefault(b, {self.tblock(b)}).add(new)

    def sync(self):
        for b, v in self.cur.items():
            if v is not None:
                self.allowed[b] = {v}

    def crashed(self):
        for b in list(self.cur):
            vals = self.allowed_of(b)
            self.cur[b] = next(iter(vals)) if len(vals) == 1 else None

    def check_block(self, b, value, what):
        if value not in self.allowed_of(b):
            synced = len(self.allowed_of(b)) == 1
            fail(f"{what}: block {b} (offset {b * BLOCK}) holds a value that is neither "
                 f"the template's nor an allowed written one "
                 f"({'synced' if synced else 'unsynced'} block, "
                 f"{'matches' if value == self.tblock(b) else 'differs from'} the template)")

    def check_range(self, data, off, what):
        """data is [off, off+len) of the disk, block-aligned."""
        for k in range(0, len(data), BLOCK):
            b = (off + k) // BLOCK
            v = data[k:k + BLOCK]
            if b in self.allowed:
                self.check_block(b, v, what)
            elif v != self.tblock(b)[:len(v)]:
                fail(f"{what}: never-written block {b} (offset {b * BLOCK}) differs "
                     "from the template")


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def random_write(rng, size, chunk):
    kind = rng.randrange(4)
    nchunks = size // chunk
    if kind == 0:                       # small, odd, anywhere
        ln = rng.randrange(1, 6000)
        off = rng.randrange(size - ln)
    elif kind == 1:                     # across a chunk boundary
        c = rng.randrange(1, nchunks)
        off = c * chunk - rng.randrange(1, 20000)
        ln = c * chunk - off + rng.randrange(1, 20000)
    elif kind == 2:                     # aligned whole chunk(s)
        c = rng.randrange(nchunks - 1)
        off, ln = c * chunk, rng.randrange(1, 3) * chunk
    else:                               # 4 KiB-aligned blocks
        off = rng.randrange(size // BLOCK - 8) * BLOCK
        ln = rng.randrange(1, 8) * BLOCK
    return off, min(ln, size - off)


def check_image_against_bitmap(img, name, model, what):
    """Every chunk the persisted bitmap calls present holds only allowed
    values in the local image itself."""
    hdr, present = read_meta(os.path.join(img, name + ".meta"))
    chunk = hdr["chunk_size"]
    with open(os.path.join(img, name + ".img"), "rb") as f:
        for c in sorted(present):
            f.seek(c * chunk)
            data = f.read(chunk)
            model.check_range(data, c * chunk, f"{what}: present chunk {c} in {name}.img")
    return hdr, present


def test_crash_loop_with_writes():
    rounds = int(os.environ.get("STREAMFS_CRASH_ROUNDS", "40"))
    seed = int(os.environ.get("STREAMFS_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    h.log(f"seed {seed} (STREAMFS_CRASH_SEED to repeat), {rounds} rounds")
    t = ws().template("crash.img", 48 * MiB)
    chunk = 256 * KiB
    tbytes = t.read()
    model = Model(tbytes)
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "c", ng.url(t.name), chunk_size="256K")
    mnt = ws().mkdir("mnt-crash")
    t0 = time.monotonic()
    stats = {"writes": 0, "syncs": 0, "closes": 0, "checked": 0}
    for rnd in range(rounds):
        speed = rng.choice(("2M", "4M", "8M"))
        m = h.Mount(ws(), img, opts=("stream=auto", f"speed={speed}"), mnt=mnt).start()
        path = m.path("c")
        fd = os.open(path, os.O_RDWR)
        try:
            for _ in range(rng.randrange(2, 7)):
                off, ln = random_write(rng, t.size, chunk)
                # Partially covered edge blocks whose value a crash left
                # uncertain: learn it first (the write keeps the rest).
                for b in {off // BLOCK, (off + ln - 1) // BLOCK}:
                    if model.unknown(b):
                        model.learn(b, pread_direct(path, b * BLOCK, BLOCK),
                                    f"round {rnd}: read before a write")
                        stats["checked"] += 1
                data = rng.randbytes(ln)
                n = os.pwrite(fd, data, off)
                if n != ln:
                    # The kernel reports the part that was written and
                    # drops the error of the rest: ask for it again.
                    try:
                        n2 = os.pwrite(fd, data[n:], off + n)
                        why = f"writing the rest wrote {n2}"
                    except OSError as e:
                        why = f"writing the rest failed: {e!r}"
                    fail(f"round {rnd}: pwrite of {ln} bytes at {off} wrote {n}; {why}\n"
                         f"streamfs stderr:\n{m.stderr()}")
                model.write(off, data)
                stats["writes"] += 1
                x = rng.random()
                if x < 0.3:
                    (os.fsync if x < 0.15 else os.fdatasync)(fd)
                    model.sync()
                    stats["syncs"] += 1
                elif x < 0.4:
                    # close(2) of a written disk makes the writes durable.
                    os.close(fd)
                    fd = -1
                    model.sync()
                    stats["closes"] += 1
                    fd = os.open(path, os.O_RDWR)
                # Read-your-writes on a few known blocks.
                known = [b for b, v in model.cur.items() if v is not None]
                for b in rng.sample(known, min(2, len(known))):
                    got = pread_direct(path, b * BLOCK, BLOCK)
                    if got != model.cur[b]:
                        fail(f"round {rnd}: block {b} (offset {b * BLOCK}) does not read "
                             "back as last written")
                    stats["checked"] += 1
            time.sleep(rng.uniform(0, 0.4))
        except BaseException:
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass
            raise
        crash(m, [fd])
        model.crashed()
        hdr, present = check_image_against_bitmap(img, "c", model, f"after crash {rnd}")
        h.log(f"round {rnd}: speed {speed}, {len(present)}/{t.size // chunk} chunks "
              "present after the crash")
    h.log(f"{rounds} rounds in {time.monotonic() - t0:.1f} s: {stats['writes']} writes, "
          f"{stats['syncs']} fsyncs, {stats['closes']} closes, "
          f"{stats['checked']} blocks read back")

    # Stream to completion; every block is the template's or allowed.
    with h.Mount(ws(), img, mnt=mnt) as m:
        path = m.path("c")
        control(m, "speed c 0")
        control(m, "start c", ok_errnos=(errno.EALREADY,))
        wait_complete(path, 120)
        final = read_file_all(path)
        if len(final) != t.size:
            fail(f"the disk reads {len(final)} bytes, template {t.size}")
        model.check_range(final, 0, "after streaming to completion")
        ng.records()
    hdr, present = read_meta(os.path.join(img, "c.meta"))
    nchunks = t.size // chunk
    if len(present) != nchunks or not hdr["flags"] & META_FLAG_COMPLETE:
        fail(f"after completion and a clean unmount c.meta has {len(present)}/{nchunks} "
             f"bits set, flags {hdr['flags']:#x}")
    expect_equal("c.img after unmount", read_file_all(os.path.join(img, "c.img")), final)

    # A complete disk needs no network.
    ng.mark()
    ng.stop()
    with h.Mount(ws(), img, mnt=mnt) as m:
        path = m.path("c")
        if xattr(path, "state") != "complete":
            fail(f"state {xattr(path, 'state')} after remounting a complete disk")
        expect_equal("complete disk with nginx stopped", read_file_all(path), final)


def test_kill9_mid_stream():
    t = ws().template("mid.img", 40 * MiB + 12345)
    chunk = MiB
    nchunks = -(-t.size // chunk)
    tbytes = t.read()
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "mid", ng.url(t.name), chunk_size="1M")
    mnt = ws().mkdir("mnt-mid")
    seen = set()
    for k, frac in enumerate((0.2, 0.45, 0.7)):
        # commit=1: progress of a busy disk saved every second or two
        m = h.Mount(ws(), img, opts=("stream=auto", "speed=4M", "commit=1"), mnt=mnt).start()
        path = m.path("mid")
        target = int(t.size * frac)
        h.wait_until(lambda: int(xattr(path, "cached")) >= target, 60,
                     f"{frac:.0%} cached")
        time.sleep(random.uniform(0, 0.3))
        crash(m)
        hdr, present = read_meta(os.path.join(img, "mid.meta"))
        if not seen <= present:
            fail(f"kill {k}: chunks present after an earlier crash are absent now: "
                 f"{sorted(seen - present)}")
        seen = present
        with open(os.path.join(img, "mid.img"), "rb") as f:
            for c in sorted(present):
                f.seek(c * chunk)
                if f.read(chunk) != tbytes[c * chunk:(c + 1) * chunk]:
                    fail(f"kill {k}: chunk {c} is present in mid.meta but mid.img holds "
                         "other bytes")
        h.log(f"kill {k} at >= {frac:.0%}: {len(present)}/{nchunks} chunks persisted, "
              "all match the template")
    if not seen:
        fail("no chunk was saved as present in 7 s of streaming with commit=1")
    # Resume: the present chunks are not fetched again.
    ng.mark()
    with h.Mount(ws(), img, mnt=mnt) as m:
        path = m.path("mid")
        control(m, "speed mid 0")
        control(m, "start mid")
        wait_complete(path, 120)
        p = h.run(["cmp", path, t.path], timeout=120)
        if p.returncode != 0:
            fail(f"cmp with the template: {p.stdout_text.strip()} {p.stderr_text.strip()}")
        recs = ng.records(uri=t.name)
    refetched = set()
    for a, b in h.ranges_of(recs):
        refetched.update(range(a // chunk, b // chunk + 1))
    if refetched & seen:
        fail(f"chunks present before the remount were fetched again: "
             f"{sorted(refetched & seen)}")
    if len(refetched) != nchunks - len(seen):
        fail(f"after the remount {len(refetched)} chunks were fetched, "
             f"{nchunks - len(seen)} were absent")
    hdr, present = read_meta(os.path.join(img, "mid.meta"))
    if len(present) != nchunks or not hdr["flags"] & META_FLAG_COMPLETE:
        fail(f"mid.meta after completion: {len(present)}/{nchunks} bits, "
             f"flags {hdr['flags']:#x}")
    if h.sha256_file(os.path.join(img, "mid.img")) != t.sha256:
        fail("mid.img differs from the template after completion")
    ng.stop()


def test_progress_saved_when_idle_and_every_commit_while_busy():
    """The flusher saves a disk's fetched chunks about a second after the
    disk goes idle, whatever commit= says; while the disk stays busy it
    saves them only every commit= seconds (saving forces the kernel to
    write back everything fetched, which would slow the fill)."""
    t = ws().template("commit.img", 64 * MiB)
    chunk = 256 * KiB
    tbytes = t.read()
    ng = h.Nginx(ws()).start()
    img = image_dir()
    h.ctl_add(img, "c", ng.url(t.name), chunk_size="256K")
    meta = os.path.join(img, "c.meta")
    mnt = ws().mkdir("mnt-commit")

    with h.Mount(ws(), img, opts=("stream=manual", "readahead=0", "commit=3600"),
                 mnt=mnt) as m:
        path = m.path("c")
        read = {3, 10, 11}
        for c in sorted(read):
            expect_equal(f"chunk {c}", pread_direct(path, c * chunk, BLOCK),
                         tbytes[c * chunk:c * chunk + BLOCK])
        t0 = time.monotonic()
        h.wait_until(lambda: read <= read_meta(meta)[1], 5,
                     "an idle disk's fetched chunks saved as present")
        h.log(f"idle disk: chunks saved {time.monotonic() - t0:.1f} s after the reads")
        if read_meta(meta)[1] != read:
            fail(f"c.meta holds other chunks than those read: {sorted(read_meta(meta)[1])}")
        # Busy: 8 MiB/s brings a chunk every 31 ms, so the disk never goes
        # a whole second without a write; commit=3600 saves nothing.
        control(m, "speed c 8M")
        control(m, "start c")
        h.wait_until(lambda: int(xattr(path, "cached")) >= 8 * MiB, 30, "8 MiB cached")
        time.sleep(3)
        cached = int(xattr(path, "cached"))
        saved = read_meta(meta)[1]
        if saved != read:
            fail(f"a busy disk with commit=3600 saved progress: {len(saved)} chunks "
                 f"in c.meta, {cached // chunk} cached")
        h.log(f"busy disk, commit=3600: {cached // chunk} chunks cached, still "
              f"{len(saved)} saved")

    with h.Mount(ws(), img, opts=("stream=auto", "speed=2M", "commit=1"), mnt=mnt) as m:
        path = m.path("c")
        start = read_meta(meta)[1]
        h.wait_until(lambda: len(read_meta(meta)[1]) >= len(start) + 2, 6,
                     "a busy disk's progress saved with commit=1")
        state = xattr(path, "state")
        if state != "streaming":
            fail(f"state {state!r} when its progress was saved: the disk was not busy")
        with open(os.path.join(img, "c.img"), "rb") as f:
            for c in sorted(read_meta(meta)[1]):
                f.seek(c * chunk)
                if f.read(chunk) != tbytes[c * chunk:(c + 1) * chunk]:
                    fail(f"chunk {c} is saved as present but c.img holds other bytes")
    ng.stop()


def small_ext4(size_mib):
    """An ext4 file system on a loop device whose backing file lives on a
    tmpfs of size_mib MiB, far smaller than the file system: writes into
    it fail once the tmpfs is full, the way a thin volume runs out.
    Returns (mountpoint, remount(), grow(mib)), or None where loop devices
    cannot be used (fails instead with CI=true)."""
    root = ws().mkdir("smallfs", unique=True)
    back, mnt = os.path.join(root, "back"), os.path.join(root, "fs")
    os.mkdir(back)
    os.mkdir(mnt)
    p = h.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", back])
    if p.returncode != 0:
        return None
    h.defer(lambda: h.run(["umount", back]), "umount tmpfs")
    disk = os.path.join(back, "disk")
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    p = h.run(["losetup", "-f", "--show", disk])
    if p.returncode != 0:
        if h.IN_CI:
            fail(f"losetup: {p.stderr_text.strip()}")
        return None
    loop = p.stdout_text.strip()
    h.defer(lambda: h.run(["losetup", "-d", loop]), "losetup -d")
    # Every metadata block written now, so that only data writes fail later.
    h.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop],
          check=True)
    h.run(["mount", loop, mnt], check=True)
    h.defer(lambda: h.run(["umount", mnt]), "umount ext4")

    def remount():
        h.run(["umount", mnt], check=True)
        h.run(["mount", loop, mnt], check=True)

    def grow(mib):
        h.run(["mount", "-o", f"remount,size={mib}M", back], check=True)

    return mnt, remount, grow


def test_passthrough_open_saves_a_disk_just_completed():
    """Reads of a passthrough descriptor never reach the daemon, so they
    could not fail with EIO for chunks that a failed sync then forgets:
    a read-only open of a disk that has just completed (before the
    flusher's idle save, up to 2 s later) saves it before it is handed to
    the kernel.  Right after that open, the metadata on disk shows every
    chunk, and a kill -9 then loses nothing."""
    kernel = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if os.geteuid() != 0 or kernel < (6, 9):
        h.log("SKIP: no FUSE passthrough here (needs root and Linux >= 6.9)")
        return
    t = ws().template("justdone.img", 6 * MiB + 4097)
    ng = h.Nginx(ws()).start()
    img = ws().mkdir("images", unique=True)
    h.ctl_add(img, "jd", ng.url(t.name), chunk_size="1M")
    meta = os.path.join(img, "jd.meta")
    nchunks = -(-t.size // MiB)
    m = h.Mount(ws(), img, opts=("stream=manual",)).start()
    path = m.path("jd")
    if h.sha256_file(path) != t.sha256:  # fetches every chunk
        fail("the disk read through the mount differs from its template")
    fd = os.open(path, os.O_RDONLY)
    _, present = read_meta(meta)
    if len(present) != nchunks:
        fail(f"after a read-only open of the completed disk, {len(present)} of {nchunks} "
             "chunks are saved: the disk was handed to the kernel unsaved")
    crash(m, [fd])
    m = h.Mount(ws(), img, opts=("stream=manual",)).start()
    try:
        if xattr(m.path("jd"), "state") != "complete":
            fail(f"state {xattr(m.path('jd'), 'state')!r} after kill -9 and remount")
        if h.sha256_file(m.path("jd")) != t.sha256:
            fail("the disk differs from its template after kill -9 and remount")
        h.log(f"all {nchunks} chunks saved by the open; complete after kill -9 and remount")
    finally:
        m.stop()
    ng.stop()


def test_failed_image_sync_saves_no_progress():
    """When the kernel cannot write the image back, fdatasync fails once
    and, with the pages it could not write dropped, succeeds the next
    time.  No bit set since the last good sync may be saved then: after a
    remount every chunk marked present must hold the template's bytes."""
    fs = small_ext4(40)
    if fs is None:
        h.log("SKIP: no loop device here; the failed-sync test did not run")
        return
    mnt_fs, remount, grow = fs
    t = ws().template("sync.img", 48 * MiB)
    tbytes = t.read()
    chunk = MiB
    ng = h.Nginx(ws()).start()
    img = os.path.join(mnt_fs, "images")
    os.mkdir(img)
    h.ctl_add(img, "s", ng.url(t.name), chunk_size="1M")
    allow = [r"cannot sync the local image", r"cannot save progress",
             r"cannot save state of disk", r"fsync failed"]
    with h.Mount(ws(), img, opts=("stream=manual", "readahead=0", "commit=1"),
                 allow=allow) as m:
        path = m.path("s")
        # 8 chunks fetched and saved while there is room (an idle disk
        # saves within 2 s); then every chunk: more than the tmpfs under
        # the file system can take.
        first = set(range(8))
        expect_equal("chunks 0-7", h.pread_all(path, 0, 8 * chunk), tbytes[:8 * chunk])
        h.wait_until(lambda: first <= read_meta(os.path.join(img, "s.meta"))[1], 10,
                     "chunks 0-7 saved")
        p = h.run(["cmp", path, t.path], timeout=120)
        if p.returncode != 0:
            fail(f"cmp before the failed sync: {p.stdout_text.strip()}")
        h.wait_until(lambda: "sync" in xattr(path, "error"), 10,
                     "the failed sync reported in user.streamfs.error")
        h.log(f"error: {xattr(path, 'error')!r}; state {xattr(path, 'state')!r}")
        if xattr(path, "state") != "error":
            fail(f"state {xattr(path, 'state')!r} after a failed sync, expected error")
        time.sleep(2.5)  # two more flusher ticks: a retry would succeed now
        fd = os.open(path, os.O_RDWR)
        try:
            os.fsync(fd)
            fail("fsync of the disk succeeded after its image could not be synced")
        except OSError as e:
            h.log(f"fsync after the failed sync: {e}")
        finally:
            try:
                os.close(fd)  # a writer's close syncs too, and fails alike
                fail("close of a writer succeeded after its image could not be synced")
            except OSError as e:
                h.log(f"close after the failed sync: {e}")
        # Every chunk reads as the template's bytes (saved before the
        # failure) or fails with EIO; none reads as what the device lost.
        # O_DIRECT: past the kernel's cache of the mounted file, which may
        # still hold what the first cmp read.
        eio = 0
        for c in range(-(-t.size // chunk)):
            try:
                got = pread_direct(path, c * chunk, 128 * KiB)
            except OSError as e:
                if e.errno != errno.EIO:
                    fail(f"read of chunk {c} after the failed sync: {e}")
                eio += 1
                continue
            if got != tbytes[c * chunk:c * chunk + 128 * KiB]:
                fail(f"chunk {c} reads as other bytes than the template's after the "
                     "failed sync")
        h.log(f"after the failed sync: {eio} chunks fail with EIO, the rest read right")
        if not eio:
            fail("no chunk fails after the failed sync: was anything lost at all?")
    remount()  # forget the page cache: read what reached the device
    hdr, present = read_meta(os.path.join(img, "s.meta"))
    with open(os.path.join(img, "s.img"), "rb") as f:
        for c in sorted(present):
            f.seek(c * chunk)
            if f.read(chunk) != tbytes[c * chunk:(c + 1) * chunk]:
                fail(f"chunk {c} is saved as present but its data never reached the "
                     f"device ({len(present)} chunks saved)")
    if not first <= present:
        fail(f"chunks saved before the failure are no longer present: {sorted(first - present)}")
    h.log(f"{len(present)} chunks saved as present, all hold the template's bytes")
    # With room again, a new mount fetches what was lost.
    grow(160)
    with h.Mount(ws(), img, opts=("stream=manual",)) as m:
        p = h.run(["cmp", m.path("s"), t.path], timeout=120)
        if p.returncode != 0:
            fail(f"cmp after the remount: {p.stdout_text.strip()}")
    ng.stop()


if __name__ == "__main__":
    h.main(globals())
