# SPDX-License-Identifier: MIT
"""How opens are served.  An open of an incomplete disk is in direct-io
mode: even a re-read of present data waits for the daemon, shared mmap
works, and later opens join that mode until it is closed.  FUSE
passthrough of complete disks: a read-only open of a complete disk
is served by the kernel from the local image, so it reads every byte
correctly while the daemon is stopped (SIGSTOP); the kernel's rule that
the opens of one file are all passthrough or all page-cached is never
broken (which would fail open(2) with EIO); a write next to a passthrough
descriptor is seen by it and by later page-cached opens; a writable open
that joins passthrough cannot write past the disk's end; -o nopassthrough
keeps every read in the daemon, -o nodirectio keeps incomplete disks
page-cached.

Passthrough needs Linux >= 6.9 and CAP_SYS_ADMIN.  Without them the tests
say so and check only that opens and reads still work (CI=true: fail).

Run: python3 tests/integration/test_passthrough.py [test_name...]
"""

import errno
import mmap
import os
import platform
import signal
import threading

import harness as h
from harness import MiB, fail


ws = h.workspace
xattr = h.xattr


KERNEL = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())


def expected(what, why):
    """True when why is None; else logs that `what` is not checked, and
    why (CI=true: fails instead)."""
    if why and os.environ.get("CI") == "true":
        fail(f"{why} (CI=true: not skipping)")
    if why:
        h.log(f"{what} not checked: {why}")
    return why is None


def passthrough_expected():
    """True when this machine can do passthrough; else logs why not."""
    why = None
    if os.geteuid() != 0:
        why = "not root (passthrough needs CAP_SYS_ADMIN)"
    elif KERNEL < (6, 9):
        why = f"kernel {platform.release()} predates FUSE passthrough (6.9)"
    return expected("passthrough", why)


def mounted_disk(name, size, opts=("stream=manual",), allow=()):
    """A template, nginx, and a mount serving it as disk `name`."""
    t = ws().template(name + ".raw", size)
    img = ws().mkdir("images", unique=True)
    ng = h.Nginx(ws()).start()
    h.ctl_add(img, name, ng.url(t.name))
    m = h.Mount(ws(), img, opts=opts, allow=allow).start()
    return t, img, ng, m


def complete_disk(name, size, opts=("stream=auto",), allow=()):
    """A template, nginx, and a mount whose disk `name` is complete."""
    t, img, ng, m = mounted_disk(name, size, opts, allow)
    h.wait_until(lambda: xattr(m.path(name), "state") == "complete", 60,
                 f"{name} complete")
    return t, img, ng, m


def all_threads_stopped(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state not in ("T", "t"):
            return False
    return True


def while_stopped(m, fn, wait):
    """Runs fn() in a thread with the daemon stopped (SIGSTOP) for up to
    `wait` seconds, then continues the daemon and lets fn finish.
    Returns (whether fn finished while the daemon was stopped, its result).
    Close no descriptor of the mount in fn: close(2) waits for the daemon."""
    done = threading.Event()
    out = {}

    def run():
        out["result"] = fn()
        done.set()

    th = threading.Thread(target=run, daemon=True)
    os.kill(m.pid, signal.SIGSTOP)
    try:
        # kill(2) returns before every thread has stopped.
        h.wait_until(lambda: all_threads_stopped(m.pid), 10, "daemon stopped")
        th.start()
        early = done.wait(wait)
    finally:
        os.kill(m.pid, signal.SIGCONT)
    th.join(30)
    if th.is_alive():
        fail("a read did not finish even after the daemon was continued")
    return early, out.get("result")


def read_fd(fd, size):
    data = bytearray()
    while len(data) < size:
        b = os.pread(fd, min(4 * MiB, size - len(data)), len(data))
        if not b:
            break
        data += b
    return bytes(data)


def test_complete_disk_is_read_without_the_daemon():
    """A read-only open of a complete disk reads every byte right while
    the daemon cannot run: the kernel serves it from the local image."""
    expected = passthrough_expected()
    size = 24 * MiB + 4321
    t, img, ng, m = complete_disk("pt", size)
    fd = os.open(m.path("pt"), os.O_RDONLY)
    try:
        if not expected:
            if h.sha256_file(m.path("pt")) != t.sha256:
                fail("complete disk differs from the template")
            return
        if "passthrough unavailable" in m.stderr():
            fail("passthrough refused on a machine that supports it:\n" + m.stderr())
        early, data = while_stopped(m, lambda: read_fd(fd, size), 20)
        if not early:
            fail("reading a complete disk waited on the stopped daemon: no passthrough")
        if data != t.read():
            fail("passthrough read differs from the template")
    finally:
        os.close(fd)  # after SIGCONT: close(2) sends FLUSH to the daemon
    m.stop()
    ng.stop()


def test_open_modes_never_mix():
    """With -o nodirectio, descriptors opened before completion stay
    page-cached and later opens join them; once a passthrough descriptor is
    open, a writable
    open joins it; its write is read back through passthrough and, after
    every passthrough descriptor is closed, through the page cache, which
    had cached the old bytes of that page."""
    passthrough_expected()
    size = 8 * MiB
    t, img, ng, m = mounted_disk("modes", size, opts=("stream=manual", "nodirectio"))
    disk = m.path("modes")
    page = 3 * MiB + 8192

    # Page-cached descriptor, open before the disk is complete.
    a = os.open(disk, os.O_RDWR)
    if os.pread(a, 4096, page) != t.read(page, 4096):
        fail("read before completion differs from the template")
    if h.control_send(m.mnt, "start modes\n")[1].split()[0] != "ok":
        fail("start refused")
    h.wait_until(lambda: xattr(disk, "state") == "complete", 60, "modes complete")
    b = os.open(disk, os.O_RDONLY)  # must join a's mode: EIO otherwise
    if os.pread(b, 65536, 0) != t.read(0, 65536):
        fail("read-only open next to a page-cached one reads wrong bytes")
    os.close(b)
    os.close(a)

    # Passthrough descriptor first, then a writable one joins it.
    c = os.open(disk, os.O_RDONLY)
    d = os.open(disk, os.O_RDWR)
    new = b"P" * 4096
    if os.pwrite(d, new, page) != 4096:
        fail("short write through a writable open")
    os.fsync(d)
    if os.pread(c, 4096, page) != new:
        fail("the other descriptor does not see the write")
    os.close(d)
    os.close(c)

    # Page-cached again: the page cached by `a` must not come back.
    e = os.open(disk, os.O_RDWR)
    if os.pread(e, 4096, page) != new:
        fail("a page-cached open after passthrough reads stale bytes")
    if os.pread(e, 4096, page + 4096) != t.read(page + 4096, 4096):
        fail("bytes next to the write changed")
    os.close(e)
    m.stop()
    ng.stop()
    with open(os.path.join(img, "modes.img"), "rb") as f:
        f.seek(page)
        if f.read(4096) != new:
            fail("the write did not reach the local image")


def test_writable_open_joining_passthrough_stays_inside_the_disk():
    """A writable descriptor that joins a passthrough one writes through
    the daemon: a write past the disk's end fails with ENOSPC and cannot
    grow the image, a write inside it is read back by the passthrough
    descriptor, and the disk still mounts whole afterwards."""
    expected = passthrough_expected()
    size = 4 * MiB
    t, img, ng, m = complete_disk("grow", size)
    disk = m.path("grow")
    image = os.path.join(img, "grow.img")
    r = os.open(disk, os.O_RDONLY)
    w = os.open(disk, os.O_RDWR)
    try:
        try:
            os.pwrite(w, b"tail", size + 100)
            fail("a write past the disk's end succeeded")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                fail(f"a write past the disk's end failed with {e!r}, expected ENOSPC")
        if os.stat(image).st_size != size:
            fail(f"the image grew to {os.stat(image).st_size} bytes")
        if os.pwrite(w, b"W" * 4096, MiB) != 4096:
            fail("short write inside the disk")
        if os.pread(r, 4096, MiB) != b"W" * 4096:
            fail("the passthrough descriptor does not see the write")
    finally:
        os.close(w)
        os.close(r)
    if expected and "passthrough unavailable" in m.stderr():
        fail("passthrough refused on a machine that supports it:\n" + m.stderr())
    m.stop()
    want = t.read(0, MiB) + b"W" * 4096 + t.read(MiB + 4096)
    m2 = h.Mount(ws(), img, opts=("stream=manual",)).start()
    if os.stat(m2.path("grow")).st_size != size or h.pread_all(m2.path("grow"), 0, size) != want:
        fail("the disk is not its template plus the one write after remount")
    m2.stop()
    ng.stop()


def direct_io_expected():
    """True when incomplete disks should open in direct-io mode (the
    kernel takes FUSE_DIRECT_IO_ALLOW_MMAP from 6.6); else logs why not."""
    why = None
    if KERNEL < (6, 6):
        why = f"kernel {platform.release()} predates FUSE_DIRECT_IO_ALLOW_MMAP (6.6)"
    return expected("direct-io", why)


def test_incomplete_disk_is_read_in_direct_io_mode():
    """A descriptor of an incomplete disk re-reads even present data
    through the daemon (no FUSE page cache: the image's is enough);
    shared mmap of it reads and writes; a descriptor opened after the disk
    completed, while the first is still open, is in direct-io mode too;
    once both are closed, a new open is served by passthrough.  The disk's
    st_blksize asks buffered readers for 512 KiB reads (max_read)."""
    expected = passthrough_expected()
    dio = direct_io_expected()
    size = 8 * MiB
    t, img, ng, m = mounted_disk("dio", size)
    disk = m.path("dio")
    if os.stat(disk).st_blksize != 512 * 1024:
        fail(f"st_blksize is {os.stat(disk).st_blksize}, expected 512 KiB")
    with open("/proc/self/mounts") as f:
        opts = [ln.split()[3] for ln in f if ln.split()[1] == m.mnt]
    if not opts or "max_read=524288" not in opts[0].split(","):
        fail(f"mounted without max_read=524288: {opts}")
    a = os.open(disk, os.O_RDWR)
    try:
        if os.pread(a, 65536, 3 * MiB) != t.read(3 * MiB, 65536):
            fail("cold read differs from the template")
        early, data = while_stopped(m, lambda: os.pread(a, 65536, 3 * MiB), 1.0)
        if early and dio:
            fail("a re-read of an incomplete disk was served from the FUSE page cache")
        if data != t.read(3 * MiB, 65536):
            fail("re-read through the daemon differs from the template")
        mmap_shared(a, t, 5 * MiB + 4096)
        if h.control_send(m.mnt, "start dio\n")[1].split()[0] != "ok":
            fail("start refused")
        h.wait_until(lambda: xattr(disk, "state") == "complete", 60, "dio complete")
        b = os.open(disk, os.O_RDONLY)
        try:
            os.pread(b, 65536, 0)  # page-cached, this would keep it
            early, data = while_stopped(m, lambda: os.pread(b, 65536, 0), 1.0)
        finally:
            os.close(b)
        if early and dio:
            fail("an open next to a direct-io descriptor did not join its mode")
        if data != t.read(0, 65536):
            fail("read next to a direct-io descriptor differs from the template")
    finally:
        os.close(a)
    if expected:
        c = os.open(disk, os.O_RDONLY)
        try:
            early, data = while_stopped(m, lambda: os.pread(c, 65536, MiB), 20)
        finally:
            os.close(c)
        if not early or data != t.read(MiB, 65536):
            fail("no passthrough once the direct-io descriptors were closed")
    m.stop()
    ng.stop()
    with open(os.path.join(img, "dio.img"), "rb") as f:
        f.seek(5 * MiB + 4096)
        if f.read(4) != b"MMAP":
            fail("the shared-mmap write did not reach the local image")


def mmap_shared(fd, t, off):
    """Reads and writes through a shared mapping of a direct-io descriptor
    (the INIT reply's FUSE_DIRECT_IO_ALLOW_MMAP)."""
    try:
        mm = mmap.mmap(fd, 2 * MiB, mmap.MAP_SHARED, offset=4 * MiB)
    except OSError as e:
        fail(f"shared mmap of an incomplete disk failed: {e!r}")
    try:
        rel = off - 4 * MiB
        if mm[rel:rel + 4096] != t.read(off, 4096):
            fail("shared mmap reads other bytes than the template")
        mm[rel:rel + 4] = b"MMAP"
        mm.flush()
    finally:
        mm.close()
    if os.pread(fd, 4, off) != b"MMAP":
        fail("a write through the shared mapping is not read back")


def test_nodirectio_keeps_incomplete_disks_page_cached():
    """With -o nodirectio a re-read of present data of an incomplete
    disk comes from the page cache, even while the daemon is stopped."""
    size = 4 * MiB
    t, img, ng, m = mounted_disk("nodio", size, opts=("stream=manual", "nodirectio"))
    fd = os.open(m.path("nodio"), os.O_RDONLY)
    try:
        if os.pread(fd, 65536, MiB) != t.read(MiB, 65536):
            fail("cold read differs from the template")
        early, data = while_stopped(m, lambda: os.pread(fd, 65536, MiB), 20)
    finally:
        os.close(fd)
    if not early or data != t.read(MiB, 65536):
        fail("with nodirectio a re-read did not come from the page cache")
    if xattr(m.path("nodio"), "state") == "complete":
        fail("the disk completed: the test proves nothing")
    m.stop()
    ng.stop()


def test_nopassthrough_keeps_reads_in_the_daemon():
    """With -o nopassthrough a complete disk's read waits for the daemon
    (stopped here) and finishes right once it runs again."""
    passthrough_expected()
    size = 4 * MiB
    t, img, ng, m = complete_disk("nopt", size, opts=("stream=auto", "nopassthrough"))
    fd = os.open(m.path("nopt"), os.O_RDONLY)
    early, data = while_stopped(m, lambda: os.pread(fd, 65536, 2 * MiB), 1.0)
    os.close(fd)
    if early:
        fail("with nopassthrough a read finished while the daemon was stopped")
    if data != t.read(2 * MiB, 65536):
        fail("read through the daemon differs from the template")
    m.stop()
    ng.stop()


if __name__ == "__main__":
    h.main(globals())
