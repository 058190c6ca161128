# SPDX-License-Identifier: MIT
"""The background streamer through a real mount: the speed limit measured
over several seconds and changed while streaming, xattrs as streaming
advances, completion recorded durably and then no network ever again
(remount with the server gone), and demand reads served before the
streamer's backlog.

Run: python3 tests/integration/test_stream.py [test_name...]
"""

import ctypes
import json
import os
import subprocess
import sys
import time
import urllib.request

import harness as h
from harness import MiB, fail


ws = h.workspace
xattr = h.xattr


def control(mnt, line):
    """The reply to one control command."""
    return h.control_send(mnt, line)[1]


def wait_state(path, want, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if xattr(path, "state") == want:
            return
        time.sleep(0.1)
    fail(f"{path}: state {xattr(path, 'state')!r}, expected {want!r} within {timeout} s")


def sample_cached(path, seconds, period=0.25):
    """[(t, cached)] sampled for `seconds`."""
    out = []
    end = time.monotonic() + seconds
    while True:
        now = time.monotonic()
        out.append((now, int(xattr(path, "cached"))))
        if now >= end:
            return out
        time.sleep(period)


def window_rates(samples, window):
    """Bytes/s over every `window`-second span of the samples."""
    rates = []
    for i, (t0, c0) in enumerate(samples):
        for t1, c1 in samples[i + 1:]:
            if t1 - t0 >= window:
                rates.append((c1 - c0) / (t1 - t0))
                break
    return rates


def test_speed_limit_honoured_and_changed_while_streaming():
    """A 2 MiB/s limit holds within 10% over every 10 s window; raising
    it to 4 MiB/s through the xattr takes effect at once; the rate xattr
    shows it; position only moves forward."""
    t = ws().template("limited.img", 96 * MiB)
    img = ws().mkdir("images", unique=True)
    with h.Nginx(ws()) as ng:
        h.ctl_add(img, "lim", ng.url(t.name))  # 1 MiB chunks: half a second each
        m = h.Mount(ws(), img, opts=("stream=auto", "speed=2M")).start()
        disk = m.path("lim")
        if xattr(disk, "speed") != str(2 * MiB):
            fail(f"speed xattr {xattr(disk, 'speed')}, expected {2 * MiB}")
        time.sleep(1.0)  # let the first chunk land
        samples = sample_cached(disk, 12)
        rates = window_rates(samples, 10)
        h.log("2M limit: 10 s window rates %s MiB/s" %
              ", ".join(f"{r / MiB:.2f}" for r in rates[:5]))
        if not rates or any(abs(r - 2 * MiB) > 0.1 * 2 * MiB for r in rates):
            fail(f"rates over 10 s windows {[round(r / MiB, 3) for r in rates]} MiB/s "
                 "are not within 10% of 2 MiB/s")
        rate = int(xattr(disk, "rate"))
        if abs(rate - 2 * MiB) > 0.25 * 2 * MiB:
            fail(f"rate xattr {rate} is far from the 2 MiB/s being streamed")
        if xattr(disk, "state") != "streaming":
            fail(f"state {xattr(disk, 'state')} while streaming")
        pos1 = int(xattr(disk, "position"))

        os.setxattr(disk, "user.streamfs.speed", b"4M")
        time.sleep(1.0)
        samples = sample_cached(disk, 11)
        rates = window_rates(samples, 10)
        h.log("4M limit: 10 s window rates %s MiB/s" %
              ", ".join(f"{r / MiB:.2f}" for r in rates[:5]))
        if not rates or any(abs(r - 4 * MiB) > 0.1 * 4 * MiB for r in rates):
            fail(f"after raising the limit, rates {[round(r / MiB, 3) for r in rates]} MiB/s "
                 "are not within 10% of 4 MiB/s")
        pos2 = int(xattr(disk, "position"))
        if pos2 <= pos1:
            fail(f"position did not advance: {pos1} then {pos2}")

        # Lifting the limit streams the rest at full speed.
        os.setxattr(disk, "user.streamfs.speed", b"0")
        wait_state(disk, "complete", 60)
        if xattr(disk, "progress") != "100.00" or int(xattr(disk, "cached")) != t.size:
            fail("complete disk does not show 100.00% / every byte cached")
        m.stop()
        if subprocess.run(["cmp", os.path.join(img, "lim.img"), t.path]).returncode != 0:
            fail("the local image differs from the template")


def test_complete_disk_never_needs_the_network():
    """Completion is recorded durably: after unmount, with nginx stopped,
    a remount serves every byte and no request reaches anybody."""
    t = ws().template("whole.img", 20 * MiB + 333)
    img = ws().mkdir("images", unique=True)
    ng = h.Nginx(ws()).start()
    h.ctl_add(img, "w", ng.url(t.name))
    m = h.Mount(ws(), img, opts=("stream=auto",)).start()
    wait_state(m.path("w"), "complete", 60)
    m.stop()
    ng.mark()
    ng.stop()
    m2 = h.Mount(ws(), img, opts=("stream=auto",)).start()
    disk = m2.path("w")
    if xattr(disk, "state") != "complete":
        fail(f"after remount state is {xattr(disk, 'state')}")
    if h.sha256_file(disk) != t.sha256:
        fail("complete disk differs from the template after remount")
    if control(m2.mnt, "start w\n").strip() != "ok complete":
        fail("start on a complete disk did not say it is complete")
    if xattr(disk, "fetched") != "0" or xattr(disk, "errors") != "0":
        fail(f"a complete disk touched the network: fetched={xattr(disk, 'fetched')} "
             f"errors={xattr(disk, 'errors')}")
    m2.stop()


def resident(path, off, length):
    """Bytes of [off, off+length) of a file in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, 1, 1, fd, off)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            fail(f"mmap {path}: {os.strerror(ctypes.get_errno())}")
        pages = (length + 4095) // 4096
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, length, vec) != 0:
            fail(f"mincore {path}: {os.strerror(ctypes.get_errno())}")
        libc.munmap(addr, length)
        return sum(b & 1 for b in vec) * 4096
    finally:
        os.close(fd)


def direct_io_works(directory):
    probe = os.path.join(directory, ".direct-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def test_streamed_chunks_bypass_the_page_cache():
    """The streamer writes its chunks with O_DIRECT: a background copy of a
    whole disk leaves the page cache alone.  A chunk fetched for a reader
    goes through the page cache, where its next read finds it, and the
    disk's short last chunk (unaligned) too.  Every byte is the template's."""
    t = ws().template("direct.img", 24 * MiB + 333)
    img = ws().mkdir("images", unique=True)
    if not direct_io_works(img):
        h.log("the image directory's filesystem refuses O_DIRECT: skipped")
        return
    ng = h.Nginx(ws()).start()
    h.ctl_add(img, "dio", ng.url(t.name), chunk_size="1M")
    image = os.path.join(img, "dio.img")
    with h.Mount(ws(), img) as m:
        disk = m.path("dio")
        fd = os.open(disk, os.O_RDONLY)
        try:
            if os.pread(fd, 4096, 5 * MiB) != t.read(5 * MiB, 4096):
                fail("a read before streaming returned other bytes than the template's")
        finally:
            os.close(fd)
        if control(m.mnt, "start dio\n").strip() != "ok":
            fail("start failed")
        wait_state(disk, "complete", 60)
        demand = resident(image, 5 * MiB, MiB)
        streamed = resident(image, 0, 5 * MiB) + resident(image, 6 * MiB, 18 * MiB)
        tail = resident(image, 24 * MiB, 4096)
        h.log(f"in the page cache: demand chunk {demand >> 10} KiB, streamed chunks "
              f"{streamed >> 10} KiB, last chunk {tail} bytes")
        if demand < MiB // 2:
            fail(f"the chunk fetched for a reader is not in the page cache ({demand} bytes)")
        if streamed > 2 * MiB:
            fail(f"{streamed >> 20} MiB of the 23 streamed chunks are in the page cache: "
                 "the streamer wrote through it")
        if tail == 0:
            fail("the short last chunk is not in the page cache: not written through it")
        if h.sha256_file(disk) != t.sha256:
            fail("the streamed disk differs from its template")
    ng.stop()
    with h.Mount(ws(), img) as m:
        if h.sha256_file(m.path("dio")) != t.sha256:
            fail("the streamed disk differs from its template after a remount")


def test_demand_read_does_not_queue_behind_the_streamer():
    """With 2 connections the streamer keeps one chunk in flight and leaves
    the other connection to demand reads.  Every transfer is slowed to
    512 KiB/s by the fault server, so a 1 MiB chunk takes 2 s: a cold read
    while the streamer is busy must take about one transfer (2 s), not
    wait for the streamer's chunk first (4 s)."""
    t = ws().template("prio.img", 16 * MiB)
    root = os.path.dirname(t.path)
    portfile = os.path.join(ws().root, "fault.port")
    server = subprocess.Popen([sys.executable, os.path.join(h.SRC, "tests", "faultserver.py"),
                               "--root", root, "--port-file", portfile,
                               "--log", os.path.join(ws().root, "fault.log")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    entry = h.defer(lambda: (server.terminate(), server.wait()), "fault server")
    deadline = time.monotonic() + 10
    while not os.path.exists(portfile):
        if time.monotonic() > deadline:
            fail("fault server did not start")
        time.sleep(0.05)
    port = int(open(portfile).read())
    url = f"http://127.0.0.1:{port}/{t.name}"
    img = ws().mkdir("images", unique=True)
    h.ctl_add(img, "p", url)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/_fault", method="POST",
                                 data=json.dumps([{"fault": "slow", "rate": 512 * 1024,
                                                   "method": "GET"}]).encode())
    urllib.request.urlopen(req, timeout=10).read()
    m = h.Mount(ws(), img, opts=("stream=manual", "connections=2")).start()
    disk = m.path("p")
    control(m.mnt, "start p\n")
    time.sleep(0.5)  # the streamer's first chunk is on the wire
    t0 = time.monotonic()
    got = h.pread_all(disk, 12 * MiB + 4096, 4096, os.O_DIRECT)
    took = time.monotonic() - t0
    h.log(f"cold 4 KiB read while streaming at 512 KiB/s per connection: {took:.2f} s")
    if got != t.read(12 * MiB + 4096, 4096):
        fail("cold read returned wrong bytes")
    if took > 3.5:
        fail(f"cold read took {took:.2f} s: it queued behind the streamer "
             "(one 1 MiB transfer at 512 KiB/s takes 2 s)")
    control(m.mnt, "stop p\n")
    m.stop()
    h.cancel(entry)
    server.terminate()
    server.wait()


def test_daemon_mode_streams():
    """Without -f streamfs detaches (fork): streaming, started after the
    fork, must still run, and fusermount3 -u ends the daemon."""
    t = ws().template("daemon.img", 8 * MiB + 5)
    img = ws().mkdir("images", unique=True)
    mnt = ws().mkdir("mnt-daemon", unique=True)
    h.ctl_add(img, "d", "file://" + t.path)
    p = subprocess.run([h.STREAMFS, "-o", "stream=auto,speed=16M", img, mnt],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        fail(f"streamfs (daemon) exited {p.returncode}: {p.stderr}")
    entry = h.defer(lambda: subprocess.run(["fusermount3", "-u", "-z", mnt]), "daemon mount")
    try:
        if not h.is_mounted(mnt, "fuse"):
            fail("the daemon returned but nothing is mounted")
        wait_state(os.path.join(mnt, "d"), "complete", 30)
        if h.sha256_file(os.path.join(mnt, "d")) != t.sha256:
            fail("daemon-mode disk differs from the template")
    finally:
        h.cancel(entry)
        subprocess.run(["fusermount3", "-u", mnt], timeout=30)
    deadline = time.monotonic() + 10
    while h.is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if h.is_mounted(mnt):
        fail("fusermount3 -u did not unmount the daemon")


if __name__ == "__main__":
    h.main(globals())
