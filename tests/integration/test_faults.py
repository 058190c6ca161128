# SPDX-License-Identifier: MIT
"""Fault integration tests: a real streamfs mount against tests/faultserver.py,
one test per injected fault (refused connections, resets, short bodies,
stalls, 5xx/429, ignored and wrong ranges, a changed template size or ETag,
a persistent outage, and the streamer resuming by itself).

Each test checks that the bytes read through the mount equal the template's,
and asserts on what streamfs asked for, from the server's JSON request log.

Run: python3 tests/integration/test_faults.py [test_name...]
(meson: meson test -C build --suite integration -v)
"""

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import harness as h
from harness import KiB, MiB, fail

FAULTSERVER = os.path.join(h.SRC, "tests", "faultserver.py")
CHUNK = MiB
SIZE = 4 * MiB + 4097          # five chunks, the last one short



ws = h.workspace


def template(name, size=SIZE):
    return ws().template(name, size)


def image_dir():
    return ws().mkdir("images", unique=True)


# ---------------------------------------------------------------------------
# The fault server
# ---------------------------------------------------------------------------

class FaultServer:
    """tests/faultserver.py serving the workspace's www/ on an ephemeral
    port, with its JSON request log.  Stopped by PID (SIGTERM, then SIGKILL)
    at the end of the test."""

    def __init__(self, w):
        self.dir = w.mkdir("faultserver", unique=True)
        self.root = w.www
        self.port_file = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "requests.jsonl")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.proc = None
        self.port = None
        self._mark = 0
        self._cleanup = None

    def start(self):
        if self.proc is not None:
            fail("faultserver already running")
        try:
            os.unlink(self.port_file)
        except FileNotFoundError:
            pass
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, FAULTSERVER, "--root", self.root,
                 "--port-file", self.port_file, "--log", self.log_path],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self._cleanup = h.defer(self.stop, "faultserver")
        deadline = time.monotonic() + h.SERVER_TIMEOUT
        while True:
            try:
                with open(self.port_file) as f:
                    text = f.read().strip()
                if text.isdigit():
                    self.port = int(text)
                    break
            except FileNotFoundError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                fail(f"faultserver did not start:\n{self._stderr()}")
            time.sleep(0.02)
        if not h.wait_port(self.port, self.proc):
            fail(f"faultserver does not answer on port {self.port}:\n{self._stderr()}")
        return self

    def _stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if self._cleanup:
            h.cancel(self._cleanup)
            self._cleanup = None
        proc.send_signal(signal.SIGTERM)
        if h.wait_for_pid_exit(proc, h.SERVER_TIMEOUT) is None:
            proc.kill()
            proc.wait()
            fail("faultserver ignored SIGTERM")
        if proc.returncode != 0:
            fail(f"faultserver exited {proc.returncode}:\n{self._stderr()}")

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    # --- rules ---

    def _control(self, method, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/_fault", data=body,
                                     method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read().decode())

    def set_rules(self, rules):
        """Replaces every rule; each rule is a dict as in the faultserver
        docstring."""
        return self._control("POST", json.dumps(rules).encode())

    def clear(self):
        self.set_rules([])

    def rules(self):
        return self._control("GET")

    # --- request log ---

    def _read_log(self):
        try:
            with open(self.log_path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _settle(self, settle):
        # A line is written after the last body byte: the client may have
        # its bytes first.  Wait until the log stops growing.
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            n = len(self._read_log())
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= settle:
                return
            time.sleep(0.05)

    def mark(self, settle=0.3):
        """Forgets every request logged so far."""
        self._settle(settle)
        self._mark = len(self._read_log())

    def records(self, path=None, settle=0.3):
        """Requests logged since the last mark(), oldest first, as dicts;
        only those for URL path `path` when given."""
        if settle:
            self._settle(settle)
        out = []
        for line in self._read_log()[self._mark:].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                fail(f"unparsable faultserver log line: {line!r}")
            if path is None or rec["path"] == path:
                out.append(rec)
        return out


def rule(fault, t, **kw):
    """A rule for GETs of template t."""
    return {"fault": fault, "path": "/" + t.name, "method": "GET", **kw}


def rec_range(rec):
    """(first, last) inclusive of a record's Range header, or None."""
    m = h.RANGE_RE.match(rec.get("range") or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def show(recs):
    return "\n".join(
        f"  {r['method']} {r['path']} range={r['range']} status={r['status']} "
        f"bytes={r['bytes']} fault={r['fault']} if_match={r['if_match']} t={r['time']}"
        for r in recs)


def is_good_fetch(rec):
    """A clean 206 whose body is the whole range asked for."""
    br = rec_range(rec)
    return (rec["fault"] is None and rec["status"] == 206 and br is not None
            and rec["bytes"] == br[1] - br[0] + 1)


def check_validator_sent(recs, want=None):
    """Every request carries one and the same If-Match (the ETag recorded
    at add); returns it."""
    tags = {r["if_match"] for r in recs}
    if None in tags or len(tags) != 1 or (want is not None and tags != {want}):
        fail(f"requests do not all carry the recorded validator"
             f"{f' {want}' if want else ''} in If-Match:\n{show(recs)}")
    return tags.pop()


def touching(recs, off, length):
    """The records whose Range overlaps [off, off+length)."""
    out = []
    for r in recs:
        br = rec_range(r)
        if br is not None and br[0] < off + length and br[1] >= off:
            out.append(r)
    return out


def check_fault_then_success(recs, fault, n, off, length, what):
    """Of the requests for the chunks holding [off, off+length), the first n
    were hit by `fault`, and then clean 206s covered the read.  Any request
    for other chunks (read-ahead) must be clean too; every request is a
    chunk-aligned range GET carrying the same If-Match."""
    for r in recs:
        if r["method"] != "GET" or rec_range(r) is None:
            fail(f"{what}: not a simple range GET:\n{show(recs)}")
    h.check_chunk_aligned([rec_range(r) for r in recs], CHUNK, SIZE)
    check_validator_sent(recs)
    mine = touching(recs, off, length)
    hit = [r for r in recs if r["fault"] == fault]
    if len(hit) != n:
        fail(f"{what}: expected {n} request(s) hit by {fault}, got {len(hit)}:\n{show(recs)}")
    if mine[:n] != hit:
        fail(f"{what}: the first requests for the chunk(s) read are not the {n} faulty "
             f"ones:\n{show(recs)}")
    good = [rec_range(r) for r in mine[n:] if is_good_fetch(r)]
    if not h.covered(good, off, off + length - 1):
        fail(f"{what}: no clean 206 after the fault covers {off}-{off + length - 1}:\n"
             f"{show(recs)}")
    others = [r for r in recs if r not in hit]
    if not all(is_good_fetch(r) for r in others):
        fail(f"{what}: a request besides the {n} faulty ones was not a clean 206:\n"
             f"{show(recs)}")
    ranges = [rec_range(r) for r in others]
    if h.overlapping(ranges):
        fail(f"{what}: a chunk was fetched twice after the retry succeeded:\n{show(recs)}")


def good_bytes(recs):
    return sum(r["bytes"] for r in recs if is_good_fetch(r))


# ---------------------------------------------------------------------------
# Reading and inspecting disks
# ---------------------------------------------------------------------------

def expect_equal(what, got, want):
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
        fail(f"{what}: {len(got)} bytes differ from the expected {len(want)} "
             f"(first difference at byte {i})")


def pread_direct(path, off, length):
    """Reads with O_DIRECT (page-aligned buffer), so the daemon serves the
    read rather than the page cache.  off and length: multiples of 4096."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        try:
            got = 0
            while got < length:
                with memoryview(buf) as whole, whole[got:] as view:
                    n = os.preadv(fd, [view], off + got)
                if n == 0:
                    break
                got += n
            return bytes(buf[:got])
        finally:
            buf.close()
    finally:
        os.close(fd)


class ReadInThread:
    """pread in a daemon thread, so a hung read cannot hang the test."""

    def __init__(self, path, off, length, direct=False):
        self.result = self.error = self.elapsed = None
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(path, off, length, direct),
                                       daemon=True)
        self.thread.start()

    def _run(self, path, off, length, direct):
        try:
            if direct:
                self.result = pread_direct(path, off, length)
            else:
                self.result = h.pread_all(path, off, length)
        except OSError as e:
            self.error = e
        self.elapsed = time.monotonic() - self.t0

    def join(self, timeout, what):
        self.thread.join(timeout)
        if self.thread.is_alive():
            fail(f"{what}: the read did not return within {timeout} s")
        return self


def read_ok(m, name, t, off, length, what, timeout=40, direct=True):
    """A read through the mount that must return the template's bytes.  By
    default with O_DIRECT: one FUSE read per call (<= 128 KiB), no page
    cache, no kernel read-ahead."""
    rd = ReadInThread(m.path(name), off, length, direct=direct).join(timeout, what)
    if rd.error is not None:
        fail(f"{what}: read of {length} bytes at {off} failed after {rd.elapsed:.1f} s: "
             f"{rd.error!r}\nstderr:\n{m.stderr()}")
    expect_equal(what, rd.result, t.read(off, length))
    return rd.elapsed


def read_eio(m, name, off, length, what, timeout=40):
    rd = ReadInThread(m.path(name), off, length, direct=True).join(timeout, what)
    if rd.error is None:
        fail(f"{what}: the read returned {len(rd.result)} bytes, expected EIO")
    if rd.error.errno != errno.EIO:
        fail(f"{what}: the read failed with {rd.error!r}, expected EIO")
    return rd.elapsed


xattr = h.xattr


def xattrs(path):
    """The counters once no demand fetch is in progress: a read may return
    before the fetch that brought its bytes has ended (the rest of its
    chunk is still arriving), and the fetch is counted when it ends."""
    h.wait_until(lambda: xattr(path, "waiting") == "0", 10, f"{path}: demand fetches to end")
    return {n: xattr(path, n) for n in ("state", "error", "errors", "fetched", "cached")}


def image_bytes(img, name, off, length):
    with open(os.path.join(img, name + ".img"), "rb") as f:
        f.seek(off)
        return f.read(length)


def check_image_region(img, name, t, off, length, what):
    """After unmount: the local image holds the template's bytes there."""
    expect_equal(f"{what}: local image {name}.img", image_bytes(img, name, off, length),
                 t.read(off, length))


def check_image_zero(img, name, off, length, what):
    """After unmount: nothing was stored there (zeros / holes)."""
    data = image_bytes(img, name, off, length)
    if data.count(0) != len(data):
        i = next(k for k, b in enumerate(data) if b)
        fail(f"{what}: local image {name}.img has data at byte {off + i} of a region "
             "that was never fetched successfully")


def control(m, cmd):
    """Writes one command to MNT/.control; returns the reply."""
    fd = os.open(m.path(".control"), os.O_RDWR)
    try:
        os.write(fd, cmd.encode())
        return os.pread(fd, 65536, 0).decode(errors="replace")
    finally:
        os.close(fd)


def chunk_command_in_thread(m, name, off):
    """Sends `chunk NAME OFF` from a thread: it returns once the chunk is
    in, or fails with its fetch.  Returns the thread and a list that gets
    the reply, or the error's text."""
    replies = []

    def run():
        try:
            replies.append(control(m, f"chunk {name} {off}\n"))
        except OSError as e:
            replies.append(e.strerror)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, replies


def setup(name, tname=None, size=SIZE):
    """A template, a fault server and a disk NAME added from it; the log is
    marked after the add's probe."""
    t = template(tname or f"f-{name}.img", size)
    srv = FaultServer(ws()).start()
    img = image_dir()
    h.ctl_add(img, name, srv.url(t.name), chunk_size="1M")
    srv.mark()
    return t, srv, img


# Daemon stderr lines each test may show (Mount(allow=...)).
TEMPLATE_CHANGED = [r"template changed", r"template size changed"]


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_refuse_retried():
    t, srv, img = setup("refuse")
    off, length = 1 * MiB + 4096, 128 * KiB
    srv.set_rules([rule("refuse", t, count=2)])
    with h.Mount(ws(), img) as m:
        read_ok(m, "refuse", t, off, length, "read with two refused connections")
        x = xattrs(m.path("refuse"))
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "refuse", 2, off, length, "refuse")
        if int(x["errors"]) < 2:
            fail(f"user.streamfs.errors is {x['errors']} after two refused connections")
        if x["error"]:
            fail(f"user.streamfs.error is {x['error']!r} after the retry succeeded")
        if x["state"] != "idle":
            fail(f"state {x['state']!r} after a retried read, expected idle")
        if int(x["fetched"]) != good_bytes(recs):
            fail(f"user.streamfs.fetched is {x['fetched']}, the server sent "
                 f"{good_bytes(recs)} bytes in clean 206s:\n{show(recs)}")
        h.log(f"refuse x2: {len(recs)} requests, xattrs {x}")
    check_image_region(img, "refuse", t, CHUNK, CHUNK, "refuse")


def test_reset_mid_body_retried():
    t, srv, img = setup("reset")
    off, length = 2 * MiB + 100, 100 * KiB
    srv.set_rules([rule("reset_mid_body", t, count=2, after_bytes=64 * KiB)])
    with h.Mount(ws(), img) as m:
        read_ok(m, "reset", t, off, length, "read with two connections reset mid-body")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "reset_mid_body", 2, off, length, "reset_mid_body")
        for r in recs[:2]:
            if r["bytes"] != 64 * KiB or r["status"] != 206:
                fail(f"the reset responses are not 206 + 64 KiB:\n{show(recs)}")
        if int(xattr(m.path("reset"), "errors")) < 2:
            fail("user.streamfs.errors < 2 after two resets")
    check_image_region(img, "reset", t, 2 * MiB, CHUNK, "reset_mid_body")
    check_image_zero(img, "reset", 0, 2 * MiB, "reset_mid_body")


def test_short_body_never_stored():
    t, srv, img = setup("short")
    off, length = 3 * MiB, 128 * KiB
    srv.set_rules([rule("short_body", t, count=2, after_bytes=100000)])
    with h.Mount(ws(), img) as m:
        read_ok(m, "short", t, off, length, "read with two short bodies")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "short_body", 2, off, length, "short_body")
        for r in recs[:2]:
            if r["bytes"] != 100000:
                fail(f"short_body responses sent {r['bytes']} bytes, expected 100000:\n"
                     f"{show(recs)}")
    srv.stop()
    check_image_region(img, "short", t, 3 * MiB, CHUNK, "short_body")
    # The server is gone: only what was stored can be served.
    with h.Mount(ws(), img, opts=("stream=manual", "timeout=2")) as m:
        again = pread_direct(m.path("short"), off, length)
        expect_equal("re-read after remount with the server stopped", again,
                     t.read(off, length))
        state = xattr(m.path("short"), "state")
        if state != "idle":
            fail(f"state {state!r} after remount, expected idle")


def test_stall_aborted_and_retried():
    # No body byte for 30 s after the first 1000: the transfer must be
    # abandoned after the stall timeout (10 s without a byte, FETCH_DEFAULT_STALL_S)
    # and retried on a new connection, well within the demand timeout (30 s).
    t, srv, img = setup("stall")
    off, length = 1 * MiB, 128 * KiB
    srv.set_rules([rule("stall", t, count=1, after_bytes=1000, seconds=30)])
    with h.Mount(ws(), img) as m:
        elapsed = read_ok(m, "stall", t, off, length, "read with a stalled response",
                          timeout=40)
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "stall", 1, off, length, "stall")
        if recs[0]["bytes"] != 1000:
            fail(f"the stalled response sent {recs[0]['bytes']} bytes:\n{show(recs)}")
        if recs[1]["client_port"] == recs[0]["client_port"]:
            fail(f"the retry reused the stalled connection:\n{show(recs)}")
        gap = recs[1]["time"] - recs[0]["time"]
        h.log(f"stalled response abandoned after {gap:.1f} s; the read took {elapsed:.1f} s")
        if elapsed > 15:
            fail(f"a read whose first response stalled after 1000 bytes took {elapsed:.1f} s "
                 f"(the retry went out {gap:.1f} s after the stalled request): with a 10 s "
                 "stall timeout it should complete within ~15 s")
    check_image_region(img, "stall", t, CHUNK, CHUNK, "stall")
    srv.stop()  # wakes the stalled handler


def test_read_answered_before_its_chunk_is_whole():
    # The response stalls after the first 512 KiB of the chunk.  A read
    # inside them is answered at once, from the bytes already in (after the
    # status, Content-Range and ETag checks); the chunk is not present
    # until a retry has brought it whole; a read past the stall point waits
    # for that retry; only the whole chunk is stored.
    t, srv, img = setup("early")
    chunk_off = 2 * MiB
    srv.set_rules([rule("stall", t, count=1, after_bytes=512 * KiB, seconds=4)])
    with h.Mount(ws(), img) as m:
        elapsed = read_ok(m, "early", t, chunk_off + 64 * KiB, 64 * KiB,
                          "read inside the bytes sent before the stall")
        if elapsed > 2:
            fail(f"a read of bytes already received took {elapsed:.1f} s: it waited for "
                 "the stalled rest of its chunk")
        if xattr(m.path("early"), "cached") != "0":
            fail("the chunk counts as present while its response is stalled")
        late = read_ok(m, "early", t, chunk_off + 900 * KiB, 4 * KiB,
                       "read past the stall point")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "stall", 1, chunk_off, CHUNK, "stall")
        h.log(f"early answer after {elapsed * 1e3:.0f} ms; the read past the stall "
              f"took {late:.1f} s")
    check_image_region(img, "early", t, chunk_off, CHUNK, "early answer")
    srv.stop()


def read_late_in_chunk_2(m, srv, name, t, skip, rules, timeout):
    """Reader first needs the link learnt: reads the start of chunk 0 (one
    GET, at the 1 MiB/s set up by the caller), then sets `rules`, marks the
    log and reads 4 KiB at skip into chunk 2, which must give the
    template's bytes.  Returns the ReadInThread."""
    read_ok(m, name, t, 0, 4 * KiB, "read at the start of chunk 0")
    h.wait_until(lambda: xattr(m.path(name), "cached") == str(CHUNK), 20, "chunk 0 present")
    srv.set_rules(rules)
    srv.mark()
    rd = ReadInThread(m.path(name), 2 * MiB + skip, 4 * KiB, direct=True)
    rd.join(timeout, "read late in chunk 2")
    if rd.error is not None:
        fail(f"read late in chunk 2 failed: {rd.error!r}\nstderr:\n{m.stderr()}")
    expect_equal("read late in chunk 2", rd.result, t.read(2 * MiB + skip, 4 * KiB))
    return rd


def test_reader_first_on_a_slow_link():
    # On a link where a chunk takes much longer to arrive than a request
    # takes to get its first bytes, a read late in a chunk is fetched
    # reader first: one GET from the reader's page to the chunk's end,
    # answered from its first bytes, then one for the chunk's start.  The
    # link is learnt from the first read (1 MiB at 1 MiB/s), which starts
    # at its chunk's start and is one GET.
    t, srv, img = setup("rf")
    srv.set_rules([rule("slow", t, rate=MiB)])
    skip = 768 * KiB
    with h.Mount(ws(), img, opts=("stream=manual", "readahead=0")) as m:
        rd = read_late_in_chunk_2(m, srv, "rf", t, skip, [rule("slow", t, rate=MiB)], 40)
        h.wait_until(lambda: xattr(m.path("rf"), "cached") == str(2 * CHUNK), 20,
                     "chunk 2 present")
        recs = srv.records(f"/{t.name}")
        got = [rec_range(r) for r in recs]
        want = [(2 * MiB + skip, 3 * MiB - 1), (2 * MiB, 2 * MiB + skip - 1)]
        if got != want or not all(r["status"] == 206 and r["bytes"] == b - a + 1
                                  for r, (a, b) in zip(recs, want)):
            fail(f"chunk 2 was not fetched reader first, as {want}:\n{show(recs)}")
        # The reader's part takes 256 KiB / (1 MiB/s) = 0.25 s to send, and
        # the whole chunk 1 s: the read came back with the first bytes.
        if rd.elapsed >= 0.2:
            fail(f"the read late in chunk 2 took {rd.elapsed:.2f} s: it was not answered "
                 "from the first bytes of its part")
        h.log(f"reader-first read answered in {rd.elapsed * 1e3:.0f} ms")
        srv.mark()
        expect_equal("re-read of chunk 2", h.pread_all(m.path("rf"), 2 * MiB, CHUNK),
                     t.read(2 * MiB, CHUNK))
        if srv.records(f"/{t.name}"):
            fail("a re-read of chunk 2 fetched it again")
    check_image_region(img, "rf", t, 2 * MiB, CHUNK, "reader-first chunk")
    srv.stop()


def test_reader_first_parts_share_one_timeout():
    # The two requests of a reader-first fetch share one timeout=, counted
    # from the first: a reader waiting for the chunk's first part gets EIO
    # once timeout= has passed since the fetch began, as it would with a
    # one-request fetch, not after a timeout= of its own request.  The
    # reader's part takes 2 s (256 KiB at 128 KiB/s); the first part then
    # meets a persistent 503.  timeout=3: EIO at 3 s, where a timeout per
    # request gave 2 + 3 = 5 s.
    t, srv, img = setup("rfto")
    srv.set_rules([rule("slow", t, rate=MiB)])
    skip = 768 * KiB
    allow = [r"HTTP 503", r"cannot fetch"]
    opts = ("stream=manual", "readahead=0", "timeout=3")
    with h.Mount(ws(), img, opts=opts, allow=allow) as m:
        late = read_late_in_chunk_2(m, srv, "rfto", t, skip,
                                    [rule("slow", t, rate=128 * KiB, count=1),
                                     rule("status", t, status=503)], 10)
        if late.elapsed >= 1:
            fail(f"the read late in chunk 2 took {late.elapsed:.2f} s: it was not fetched "
                 "reader first")
        start = ReadInThread(m.path("rfto"), 2 * MiB, 4 * KiB, direct=True).join(
            20, "read at the start of chunk 2")
        if start.error is None or start.error.errno != errno.EIO:
            fail(f"the read at the start of chunk 2 gave {start.error or start.result!r}, "
                 "expected EIO")
        since = start.t0 + start.elapsed - late.t0
        h.log(f"EIO for the first part {since:.2f} s after the reader-first fetch began")
        if not 2.5 <= since <= 3.8:
            fail(f"the read of chunk 2's first part failed {since:.2f} s after the fetch "
                 "began, with timeout=3: expected 2.5-3.8 s")
        recs = srv.records(f"/{t.name}")
        if (not recs or rec_range(recs[0]) != (2 * MiB + skip, 3 * MiB - 1)
                or recs[0]["status"] != 206
                or any(rec_range(r) != (2 * MiB, 2 * MiB + skip - 1) or r["status"] != 503
                       for r in recs[1:]) or len(recs) < 2):
            fail(f"expected the reader's part, then 503s for the first part:\n{show(recs)}")
        h.wait_until(lambda: xattr(m.path("rfto"), "waiting") == "0", 10, "fetches to end")
        if xattr(m.path("rfto"), "cached") != str(CHUNK):
            fail("chunk 2 counts as present though its first part never arrived")
        srv.set_rules([])
        read_ok(m, "rfto", t, 2 * MiB, 4 * KiB, "read of chunk 2 once the server is back")
    srv.stop()


def test_a_template_down_does_not_hold_up_another_disk():
    # Demand fetch buffers share one budget over all disks (16 MiB; two
    # chunks with 16M chunks).  Fills of a disk whose template answers 503
    # hold it while they retry, up to timeout=; a cold read of another
    # disk waits at most 1 s for it, not for their timeout=.
    ta = template("f-downa.img", 48 * MiB)
    tb = template("f-upb.img", 16 * MiB)
    srv = FaultServer(ws()).start()
    img = image_dir()
    h.ctl_add(img, "downa", srv.url(ta.name), chunk_size="16M")
    h.ctl_add(img, "upb", srv.url(tb.name), chunk_size="16M")
    srv.set_rules([rule("status", ta, status=503)])
    allow = [r"HTTP 503", r"cannot fetch"]
    opts = ("stream=manual", "readahead=0", "timeout=6")
    with h.Mount(ws(), img, opts=opts, allow=allow) as m:
        stuck = [ReadInThread(m.path("downa"), k * 16 * MiB, 4 * KiB, direct=True)
                 for k in range(3)]
        time.sleep(0.5)
        rd = ReadInThread(m.path("upb"), 4 * KiB, 4 * KiB, direct=True).join(
            30, "cold read of the other disk")
        if rd.error is not None:
            fail(f"the read of the other disk failed: {rd.error!r}\nstderr:\n{m.stderr()}")
        expect_equal("cold read of the other disk", rd.result, tb.read(4 * KiB, 4 * KiB))
        h.log(f"cold read of a healthy disk while another's template is down: "
              f"{rd.elapsed:.2f} s")
        if rd.elapsed > 3.5:
            fail(f"the cold read of a healthy disk took {rd.elapsed:.2f} s while reads of a "
                 "disk whose template is down retried (timeout=6): it waited for their "
                 "fetch buffers")
        for k, st in enumerate(stuck):
            st.join(30, f"read of chunk {k} of the disk whose template is down")
            if st.error is None or st.error.errno != errno.EIO:
                fail(f"read of chunk {k} of the disk whose template is down gave "
                     f"{st.error or st.result!r}, expected EIO")
    srv.stop()


def stream_beside_a_cold_read(name, fault, opts=(), allow=(), **fault_args):
    """Disk NAMEa's cold read at 4 MiB, under rule(fault, **fault_args), while disk
    NAMEb (32 MiB) streams from 0.3 s into the read until complete.
    Returns the read (ReadInThread, joined), the sizes in MiB of NAMEb's
    requests that ended while it was under way, and NAMEa's template."""
    ta = template(f"f-{name}a.img", 8 * MiB)
    tb = template(f"f-{name}b.img", 32 * MiB)
    srv = FaultServer(ws()).start()
    img = image_dir()
    h.ctl_add(img, name + "a", srv.url(ta.name))
    h.ctl_add(img, name + "b", srv.url(tb.name))
    with h.Mount(ws(), img, opts=("stream=manual", "readahead=0") + opts, allow=allow) as m:
        srv.mark()
        srv.set_rules([rule(fault, ta, **fault_args)])
        rd = ReadInThread(m.path(name + "a"), 4 * MiB, 4 * KiB, direct=True)
        time.sleep(0.3)  # the read's fetch is under way
        control(m, f"start {name}b\n")
        rd.join(30, f"cold read of {name}a")
        read_end = time.time() - (time.monotonic() - (rd.t0 + rd.elapsed))
        h.wait_until(lambda: xattr(m.path(name + "b"), "state") == "complete", 60,
                     f"{name}b complete")
        recs = srv.records(f"/{tb.name}")
        during = [r for r in recs if r["time"] < read_end - 0.05]
        sizes = [(rec_range(r)[1] - rec_range(r)[0] + 1) // MiB for r in during]
        h.log(f"{name}b's requests (MiB) during {name}a's read ({rd.elapsed:.2f} s): {sizes}; "
              f"{len(recs) - len(during)} after")
        if not during:
            fail(f"{name}b's stream made no request during {name}a's read: it is held back "
                 f"for half of the time at most\n{show(recs)}")
        if rd.elapsed < 1.5:
            fail(f"the cold read of {name}a took {rd.elapsed:.2f} s: the fault did not "
                 "apply, so nothing here was tested")
    check_image_region(img, name + "b", tb, 0, tb.size, f"{name}b streamed")
    srv.stop()
    return rd, sizes, ta


def test_a_demand_read_holds_back_another_disks_stream():
    # While a demand request of any disk is under way, the background work
    # of every disk of the mount holds back: the streamer sleeps before
    # each new request (half of the time at most), and its run size starts
    # again from one chunk each time, where it grows to 4 chunks when
    # nothing waits (see test_streamer_run_stored_chunk_by_chunk).  Disk
    # holda's cold read waits 2 s for its response while disk holdb
    # streams.
    rd, sizes, ta = stream_beside_a_cold_read("hold", "delay", seconds=2, count=1)
    if rd.error is not None:
        fail(f"the cold read of holda failed: {rd.error!r}")
    expect_equal("cold read of holda", rd.result, ta.read(4 * MiB, 4 * KiB))
    # A worker can still take a run another one grew between its hold and
    # its request: most, not all, are one chunk.
    if sum(s > 1 for s in sizes) * 4 > len(sizes):
        fail(f"holdb's streamer asked for runs of chunks ({sizes} MiB) while a demand "
             "request of holda was under way, as if nothing waited")


def test_a_template_down_does_not_slow_another_disks_stream():
    # A demand read whose template answers 503 retries until timeout=,
    # between attempts that ask nothing of the link or the CPU.  Its disk's
    # streamer holds back meanwhile, but not the streams of other disks:
    # disk sickb streams in runs of up to 4 chunks as usual.
    rd, sizes, _ = stream_beside_a_cold_read("sick", "status", status=503, opts=("timeout=3",),
                                             allow=(r"HTTP 503", r"cannot fetch"))
    if rd.error is None or rd.error.errno != errno.EIO:
        fail(f"the read of sicka gave {rd.error or rd.result!r}, expected EIO")
    if max(sizes) < 4:
        fail(f"sickb's streamer asked for no run of 4 chunks ({sizes} MiB) while sicka's "
             "read retried a template that answers 503: it held back for a fetch that "
             "asked nothing of the link")


def test_streamer_run_stored_chunk_by_chunk():
    # Every response stalls after 1.5 MiB.  The streamer asks for runs of
    # 1, 2, then 4 chunks: only its first run (one chunk) can complete.
    # Each chunk of a run is stored as soon as it has arrived, so the first
    # chunk of every stalled run is present too, while its response hangs.
    size = 16 * MiB
    t, srv, img = setup("runstore", size=size)
    srv.set_rules([rule("stall", t, after_bytes=3 * MiB // 2, seconds=3)])
    with h.Mount(ws(), img, opts=("stream=manual",)) as m:
        path = m.path("runstore")
        control(m, "start runstore\n")
        deadline = time.monotonic() + 2.5
        while int(xattr(path, "cached")) < 2 * MiB:
            if time.monotonic() > deadline:
                fail(f"{xattr(path, 'cached')} bytes cached 2.5 s into a stream whose "
                     "responses all stall after 1.5 MiB: the first chunks of its runs "
                     "were not stored while the rest of each run was on the way")
            time.sleep(0.05)
        h.log(f"{xattr(path, 'cached')} bytes cached while every response stalls")
        read_ok(m, "runstore", t, MiB + 4096, 4096, "read of a chunk stored early")
        srv.set_rules([])
        h.wait_until(lambda: xattr(path, "state") == "complete", 60, "runstore complete")
    check_image_region(img, "runstore", t, 0, size, "runs stored chunk by chunk")
    srv.stop()


def test_16m_chunks_stream_two_requests_at_once():
    # The background buffer budget is 24 MiB: a 16 MiB chunk would leave
    # the streamer one request at a time, slower than a single curl at
    # 20 ms.  A chunk of more than half the budget may run beside another.
    # Every transfer is slowed to 16 MiB/s, so each request takes 1 s.
    t = template("f-16m.img", 64 * MiB)
    srv = FaultServer(ws()).start()
    img = image_dir()
    h.ctl_add(img, "big", srv.url(t.name), chunk_size="16M")
    srv.mark()
    srv.set_rules([rule("slow", t, rate=16 * MiB)])
    with h.Mount(ws(), img, opts=("stream=manual", "connections=3")) as m:
        path = m.path("big")
        control(m, "start big\n")
        h.wait_until(lambda: xattr(path, "state") == "complete", 30, "big complete")
    gets = sorted((r for r in srv.records("/" + t.name) if r["method"] == "GET"),
                  key=lambda r: r["time"])
    if len(gets) != 4:
        fail(f"{len(gets)} GETs for 4 chunks of 16 MiB:\n{show(gets)}")
    gap = gets[1]["time"] - gets[0]["time"]
    h.log(f"the streamer's first two 16 MiB requests started {gap:.2f} s apart")
    if gap > 0.5:
        fail(f"the second 16 MiB request started {gap:.2f} s after the first (each takes "
             f"1 s): one background request at a time\n{show(gets)}")
    check_image_region(img, "big", t, 0, t.size, "16M chunks")
    srv.stop()


def test_a_read_waiting_for_a_failed_stream_fetch_fetches_itself():
    """The streamer gives up on a chunk after three attempts; a VM's read
    waiting for that fetch must not fail with it, but fetch the chunk
    itself within its own timeout."""
    t, srv, img = setup("inherit")
    idx = 3
    allow = [r"HTTP 503|cannot fetch"]
    with h.Mount(ws(), img, opts=("stream=manual",), allow=allow) as m:
        # The read spans chunk idx and the present chunk after it, so it
        # waits for the stream's fetch (a small read within the chunk
        # would read through it with a request of its own).
        read_ok(m, "inherit", t, (idx + 1) * CHUNK, 4 * KiB, "read of the next chunk")
        h.wait_until(lambda: xattr(m.path("inherit"), "cached") == str(t.size - 4 * CHUNK), 10,
                     "the next chunk to be stored")
        srv.mark()
        # The stream's three attempts get 503s with Retry-After: 1, so the
        # fetch fails after 2 s, with no transfer to preempt while the read
        # waits.  The read's own request gets no fault.
        srv.set_rules([rule("status", t, count=3, status=503, retry_after=1)])
        stream, replies = chunk_command_in_thread(m, "inherit", idx * CHUNK)
        h.wait_until(lambda: srv.records(f"/{t.name}", settle=0), 5,
                     "the stream's first request")
        off = (idx + 1) * CHUNK - 32 * KiB
        elapsed = read_ok(m, "inherit", t, off, 64 * KiB,
                          "read of a chunk whose stream fetch fails")
        stream.join(30)
        recs = srv.records(f"/{t.name}")
        faulty = [r for r in recs if r["fault"]]
        if len(faulty) != 3 or recs[:3] != faulty:
            fail(f"expected the stream's three faulty attempts first:\n{show(recs)}")
        if not replies or "error" not in replies[0].lower():
            fail(f"the chunk command replied {replies!r}: its fetch was to fail")
        if not any(is_good_fetch(r) and r["time"] >= faulty[-1]["time"]
                   for r in touching(recs, off, 64 * KiB)):
            fail(f"no clean fetch of the chunk after the stream's failure:\n{show(recs)}")
        h.log(f"read waiting for a failing stream fetch: returned after {elapsed:.2f} s, "
              f"chunk command replied {replies[0].strip() if replies else None!r}")
    check_image_region(img, "inherit", t, idx * CHUNK, CHUNK, "read after a failed stream fetch")
    srv.stop()


def test_a_read_does_not_wait_for_a_slow_stream_transfer():
    """The chunk command's transfer of a chunk comes slowly: at 128 KiB/s
    (8 s), then for another chunk at 2 KiB/s (a trickle, under the 10 s
    stall rule).  A VM's read of that chunk must not wait for it, but
    preempt it and fetch the chunk itself, with no error shown; the chunk
    command then succeeds.  A read before teaches streamfs the link."""
    t, srv, img = setup("preempt")
    with h.Mount(ws(), img, opts=("stream=manual",)) as m:
        p = m.path("preempt")
        read_ok(m, "preempt", t, 3 * CHUNK, 4 * KiB, "read that measures the link")
        for k, (idx, rate) in enumerate(((2, 128 * KiB), (1, 2 * KiB))):
            what = f"chunk {idx} streamed at {rate // KiB} KiB/s"
            # The chunks read so far are stored (in the background).
            cached = str((k + 1) * CHUNK)
            h.wait_until(lambda: xattr(p, "cached") == cached, 10, "the chunks read to be stored")
            srv.mark()
            srv.set_rules([rule("slow", t, rate=rate, count=1)])
            stream, replies = chunk_command_in_thread(m, "preempt", idx * CHUNK)
            time.sleep(1)
            if xattr(p, "cached") != cached:
                fail(f"{what}: cached {xattr(p, 'cached')} before the read: the test's "
                     "timing does not hold")
            # Across into the next chunk, present: a read within the
            # chunk alone would read through it (the next test).
            off = (idx + 1) * CHUNK - 32 * KiB
            elapsed = read_ok(m, "preempt", t, off, 64 * KiB, f"{what}: read of the chunk")
            if elapsed > 2.5:
                fail(f"{what}: the read waited {elapsed:.2f} s for the stream's transfer")
            stream.join(20)
            if not replies or "error" in replies[0].lower():
                fail(f"{what}: the chunk command replied {replies!r} after its transfer "
                     "was preempted")
            x = xattrs(p)
            if x["error"] or x["errors"] != "0":
                fail(f"{what}: a preempted transfer shows as an error: error {x['error']!r}, "
                     f"errors {x['errors']}")
            recs = srv.records(f"/{t.name}")
            slow = [r for r in recs if r["fault"] == "slow"]
            # The read's own fetch: one request, or two (reader first).
            good = [rec_range(r) for r in recs if is_good_fetch(r) and not r["fault"]]
            if (len(slow) != 1 or not h.covered(good, idx * CHUNK, (idx + 1) * CHUNK - 1)
                    or h.overlapping(good) or len(good) > 2):
                fail(f"{what}: expected the slow stream transfer, then one fetch of the "
                     f"read's chunk:\n{show(recs)}")
            h.log(f"{what}: the read took {elapsed:.2f} s; chunk command "
                  f"{replies[0].strip()!r}")
    for idx in (1, 2):
        check_image_region(img, "preempt", t, idx * CHUNK, CHUNK, f"preempted chunk {idx}")
    srv.stop()


def test_a_small_read_of_a_chunk_in_flight_reads_through():
    """The chunk command's transfer of a chunk comes at 256 KiB/s (4 s).
    A 64 KiB read within that chunk fetches its own range at once and is
    answered from it; the stream's transfer goes on, is not preempted, and
    stores the chunk."""
    t, srv, img = setup("through")
    idx = 2
    with h.Mount(ws(), img, opts=("stream=manual",)) as m:
        p = m.path("through")
        srv.mark()
        srv.set_rules([rule("slow", t, rate=256 * KiB, count=1)])
        stream, replies = chunk_command_in_thread(m, "through", idx * CHUNK)
        time.sleep(1)  # the server logs a request once it has answered it
        off = idx * CHUNK + 300 * KiB
        elapsed = read_ok(m, "through", t, off, 64 * KiB, "read of a chunk in flight")
        cached = xattr(p, "cached")
        if elapsed > 1.5:
            fail(f"the read of a chunk in flight took {elapsed:.2f} s")
        if cached != "0":
            fail(f"cached {cached} right after the read: the slow transfer was not under way")
        stream.join(20)
        if not replies or "error" in replies[0].lower():
            fail(f"the chunk command replied {replies!r}")
        recs = srv.records(f"/{t.name}")
        slow = [r for r in recs if r["fault"] == "slow"]
        own = [r for r in recs if is_good_fetch(r) and rec_range(r) == (off, off + 64 * KiB - 1)]
        if len(slow) != 1 or rec_range(slow[0]) != (idx * CHUNK, (idx + 1) * CHUNK - 1) \
                or len(own) != 1 or len(recs) != 2:
            fail(f"expected the slow stream transfer of the chunk and one request of the "
                 f"read's range:\n{show(recs)}")
        x = xattrs(p)
        if x["cached"] != str(CHUNK) or x["error"] or x["errors"] != "0":
            fail(f"after the stream's transfer: cached {x['cached']}, error {x['error']!r}, "
                 f"errors {x['errors']}")
        h.log(f"read of a chunk in flight: {elapsed:.3f} s; chunk command "
              f"{replies[0].strip()!r}")
    check_image_region(img, "through", t, idx * CHUNK, CHUNK, "chunk stored by the stream")
    check_image_zero(img, "through", 0, idx * CHUNK, "read through")
    srv.stop()


def test_concurrent_small_reads_of_a_chunk_in_flight():
    """Two 64 KiB reads at once within a chunk the stream brings slowly:
    one reads through it (its request answered after a 0.2 s delay, within
    the read-through's half second, so that the other comes meanwhile),
    the other waits for the stream's fill
    (which its wait preempts), so the reads make one request of a read's
    range between them; both get the template's bytes, with no error."""
    t, srv, img = setup("through2")
    idx = 1
    with h.Mount(ws(), img, opts=("stream=manual",)) as m:
        p = m.path("through2")
        read_ok(m, "through2", t, 3 * CHUNK, 4 * KiB, "read that measures the link")
        h.wait_until(lambda: xattr(p, "cached") == str(CHUNK), 10, "the first read's store")
        srv.mark()
        srv.set_rules([rule("slow", t, rate=128 * KiB, count=1),
                       rule("delay", t, seconds=0.2, count=1)])
        stream, replies = chunk_command_in_thread(m, "through2", idx * CHUNK)
        time.sleep(1)  # the server logs a request once it has answered it
        offs = (idx * CHUNK + 128 * KiB, idx * CHUNK + 640 * KiB)
        times, errs = {}, []

        def reader(off):
            try:
                times[off] = read_ok(m, "through2", t, off, 64 * KiB, f"read at {off}")
            except BaseException as e:  # noqa: BLE001 - reported below
                errs.append(e)
        threads = [threading.Thread(target=reader, args=(o,)) for o in offs]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        if errs:
            raise errs[0]
        if len(times) != 2 or max(times.values()) > 2.5:
            fail(f"reads of a chunk in flight took {times}")
        stream.join(20)
        if not replies or "error" in replies[0].lower():
            fail(f"the chunk command replied {replies!r}")
        recs = srv.records(f"/{t.name}")
        own = [r for r in recs if r["status"] == 206 and rec_range(r) in
               {(o, o + 64 * KiB - 1) for o in offs}]
        if len(own) != 1:
            fail(f"expected one request of a read's range:\n{show(recs)}")
        x = xattrs(p)
        if x["error"] or x["errors"] != "0":
            fail(f"error {x['error']!r}, errors {x['errors']}")
        h.log(f"two reads of a chunk in flight: {sorted(times.values())} s")
    check_image_region(img, "through2", t, idx * CHUNK, CHUNK, "chunk read twice in flight")
    srv.stop()


def test_a_read_through_that_stalls_or_finds_a_change():
    """A read through a chunk in flight gets half a second, not the read's
    whole timeout: when its request stalls, the read goes back to waiting
    for the stream's transfer (which it preempts, being slow) and fetches
    the chunk itself.  When its request finds the template changed, the
    disk fails at once, as a fill's would."""
    t, srv, img = setup("throughf")
    with h.Mount(ws(), img, opts=("stream=manual",), allow=TEMPLATE_CHANGED) as m:
        p = m.path("throughf")
        read_ok(m, "throughf", t, 3 * CHUNK, 4 * KiB, "read that measures the link")
        h.wait_until(lambda: xattr(p, "cached") == str(CHUNK), 10, "the first read's store")
        srv.set_rules([rule("slow", t, rate=128 * KiB, count=1),
                       rule("stall", t, count=1)])
        stream, replies = chunk_command_in_thread(m, "throughf", 1 * CHUNK)
        time.sleep(1)  # the server logs a request once it has answered it
        elapsed = read_ok(m, "throughf", t, CHUNK + 200 * KiB, 64 * KiB,
                          "read whose read-through stalls")
        if elapsed > 2:
            fail(f"the read took {elapsed:.2f} s: its read-through's stall held it")
        stream.join(20)
        h.log(f"read-through stalled: the read took {elapsed:.2f} s")

        srv.mark()
        srv.set_rules([rule("slow", t, rate=128 * KiB, count=1),
                       rule("replaced", t, count=1)])
        stream, replies = chunk_command_in_thread(m, "throughf", 2 * CHUNK)
        time.sleep(1)
        elapsed = read_eio(m, "throughf", 2 * CHUNK + 200 * KiB, 64 * KiB,
                           "read whose read-through finds the template changed")
        x = xattrs(p)
        if elapsed > 1.5 or x["state"] != "error" or "template changed" not in x["error"]:
            fail(f"after a read-through met a changed template: EIO after {elapsed:.2f} s, "
                 f"state {x['state']!r}, error {x['error']!r}")
        stream.join(20)
        h.log(f"read-through met a change: EIO after {elapsed:.2f} s")
    srv.stop()


def test_status_5xx_429_retried():
    t, srv, img = setup("status")
    with h.Mount(ws(), img) as m:
        # 503 with Retry-After: 1 -> each retry waits at least a second.
        off = 1 * MiB + 8192
        srv.set_rules([rule("status", t, count=2, status=503, retry_after=1)])
        read_ok(m, "status", t, off, 64 * KiB, "read after two 503 Retry-After: 1")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "status", 2, off, 64 * KiB, "503 Retry-After")
        if any(r["status"] != 503 for r in recs[:2]):
            fail(f"expected two 503s first:\n{show(recs)}")
        gaps = [b["time"] - a["time"] for a, b in zip(recs, recs[1:3])]
        if min(gaps) < 0.95:
            fail(f"a retry after '503 Retry-After: 1' came after {min(gaps):.3f} s, "
                 f"expected >= 1 s:\n{show(recs)}")
        h.log(f"503 Retry-After: 1: retries after {', '.join(f'{g:.2f}' for g in gaps)} s")

        # Plain 500, three times.
        srv.mark()
        off = 2 * MiB + 5
        srv.set_rules([rule("status", t, count=3, status=500)])
        read_ok(m, "status", t, off, 64 * KiB, "read after three 500s")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "status", 3, off, 64 * KiB, "500")
        if any(r["status"] != 500 for r in recs[:3]):
            fail(f"expected three 500s first:\n{show(recs)}")

        # 429 Too Many Requests.
        srv.mark()
        off = 3 * MiB + 77
        srv.set_rules([rule("status", t, count=1, status=429)])
        read_ok(m, "status", t, off, 64 * KiB, "read after a 429")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "status", 1, off, 64 * KiB, "429")
        if recs[0]["status"] != 429:
            fail(f"expected a 429 first:\n{show(recs)}")

        x = xattrs(m.path("status"))
        if int(x["errors"]) < 6:
            fail(f"user.streamfs.errors is {x['errors']} after six failed responses")
        if x["state"] != "idle" or x["error"]:
            fail(f"after retried reads: state {x['state']!r}, error {x['error']!r}")
    for c in (1, 2, 3):
        check_image_region(img, "status", t, c * CHUNK, CHUNK, "status")


def test_ignore_range_never_stored():
    t, srv, img = setup("norange")
    off, length = 1 * MiB + 12345, 100 * KiB
    srv.set_rules([rule("ignore_range", t, count=1)])
    with h.Mount(ws(), img) as m:
        read_ok(m, "norange", t, off, length, "read after a 200 that ignored Range")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "ignore_range", 1, off, length, "ignore_range")
        if recs[0]["status"] != 200:
            fail(f"the ignore_range response was not a 200:\n{show(recs)}")
    check_image_region(img, "norange", t, CHUNK, CHUNK, "ignore_range")
    check_image_zero(img, "norange", 0, CHUNK, "ignore_range")
    check_image_zero(img, "norange", 2 * CHUNK, t.size - 2 * CHUNK, "ignore_range")

    # A server that ignores ranges for good is refused at add.
    srv.set_rules([rule("ignore_range", t)])
    img2 = image_dir()
    rc, out, err = h.ctl("add", img2, "never", srv.url(t.name))
    lines = err.splitlines()
    if rc == 0 or len(lines) != 1 or "range" not in lines[0].lower():
        fail(f"add from a server ignoring Range: rc {rc}, stderr {err!r}; expected a "
             "non-zero exit and one line about ranges")
    if os.listdir(img2):
        fail(f"a refused add left files: {os.listdir(img2)}")
    h.log(f"add refused: {lines[0]}")


def test_wrong_range_retried():
    t, srv, img = setup("wrongrange")
    off, length = 2 * MiB + 4096, 64 * KiB
    srv.set_rules([rule("wrong_range", t, count=1, shift=4096)])
    with h.Mount(ws(), img) as m:
        read_ok(m, "wrongrange", t, off, length, "read after a shifted Content-Range")
        recs = srv.records(f"/{t.name}")
        check_fault_then_success(recs, "wrong_range", 1, off, length, "wrong_range")
        if int(xattr(m.path("wrongrange"), "errors")) < 1:
            fail("user.streamfs.errors is 0 after a wrong Content-Range")
    check_image_region(img, "wrongrange", t, 2 * CHUNK, CHUNK, "wrong_range")


def test_wrong_total_is_template_change():
    t, srv, img = setup("wrongtotal")
    with h.Mount(ws(), img, allow=TEMPLATE_CHANGED) as m:
        p = m.path("wrongtotal")
        read_ok(m, "wrongtotal", t, 0, 64 * KiB, "read before the size changes")
        srv.mark()
        srv.set_rules([rule("wrong_total", t)])
        first = elapsed = read_eio(m, "wrongtotal", 2 * MiB, 64 * KiB,
                                   "read when the server reports another total size")
        if elapsed > 5:
            fail(f"EIO took {elapsed:.1f} s: a changed size is not worth retrying")
        x = xattrs(p)
        if x["state"] != "error":
            fail(f"state {x['state']!r} after the template changed size, expected error")
        if "size" not in x["error"] or str(t.size) not in x["error"]:
            fail(f"user.streamfs.error does not name the size change: {x['error']!r}")
        recs = srv.records(f"/{t.name}")
        if not recs or any(r["fault"] != "wrong_total" for r in recs):
            fail(f"expected only wrong_total responses:\n{show(recs)}")
        # Further absent reads fail at once, without asking the server.
        srv.mark()
        elapsed = read_eio(m, "wrongtotal", 3 * MiB, 4096, "second absent read")
        if elapsed > 1:
            fail(f"the second absent read took {elapsed:.1f} s to fail")
        if srv.records(f"/{t.name}"):
            fail(f"a disk in error still fetched:\n{show(srv.records(f'/{t.name}'))}")
        # Present data are still served.
        expect_equal("present data after the error", pread_direct(p, 0, 64 * KiB),
                     t.read(0, 64 * KiB))
        h.log(f"wrong total: EIO after {first:.2f} s, error {x['error']!r}")
    check_image_region(img, "wrongtotal", t, 0, CHUNK, "wrong_total")
    check_image_zero(img, "wrongtotal", CHUNK, t.size - CHUNK, "wrong_total")


def test_change_etag_is_template_change():
    t, srv, img = setup("etag")
    present = (1 * MiB, 128 * KiB)
    with h.Mount(ws(), img, allow=TEMPLATE_CHANGED) as m:
        p = m.path("etag")
        read_ok(m, "etag", t, *present, "read before the template changes")
        before = srv.records(f"/{t.name}")
        etag = check_validator_sent(before)
        srv.mark()
        srv.set_rules([rule("change_etag", t)])
        elapsed = read_eio(m, "etag", 3 * MiB, 64 * KiB, "read after the template changed")
        if elapsed > 5:
            fail(f"EIO took {elapsed:.1f} s: a changed template is not worth retrying")
        x = xattrs(p)
        if x["state"] != "error":
            fail(f"state {x['state']!r} after the template changed, expected error")
        if "template changed" not in x["error"]:
            fail(f"user.streamfs.error does not say 'template changed': {x['error']!r}")
        recs = srv.records(f"/{t.name}")
        if not recs:
            fail("no request reached the server after the change")
        check_validator_sent(recs, etag)
        if any(r["status"] != 412 for r in recs):
            fail(f"the old ETag in If-Match should give 412:\n{show(recs)}")
        # Absent data fail at once, with no request; present data are served.
        srv.mark()
        for off in (0, 2 * MiB, 4 * MiB):
            e2 = read_eio(m, "etag", off, 4096, f"absent read at {off} after the change")
            if e2 > 1:
                fail(f"absent read at {off} took {e2:.1f} s to fail")
        if srv.records(f"/{t.name}"):
            fail(f"a disk in error still fetched:\n{show(srv.records(f'/{t.name}'))}")
        expect_equal("present data after the change (O_DIRECT)",
                     pread_direct(p, *present), t.read(*present))
        expect_equal("present data after the change", h.pread_all(p, *present),
                     t.read(*present))
        h.log(f"changed ETag: EIO after {elapsed:.2f} s, error {x['error']!r}")
    # Nothing of the "new" template was stored.
    check_image_region(img, "etag", t, CHUNK, CHUNK, "change_etag")
    check_image_zero(img, "etag", 0, CHUNK, "change_etag")
    check_image_zero(img, "etag", 2 * CHUNK, t.size - 2 * CHUNK, "change_etag")


def test_a_template_change_outlives_a_remount():
    """A template change is kept with the disk: after a remount the disk
    is in state error at once, with no request, and `start` asks the
    template again: it changes nothing while the server cannot answer,
    fails while the template differs, and clears the error once the
    template is the one the disk was added from."""
    t, srv, img = setup("stale")
    present = (1 * MiB, 128 * KiB)
    changed = [rule("change_etag", t)]
    with h.Mount(ws(), img, allow=TEMPLATE_CHANGED) as m:
        read_ok(m, "stale", t, *present, "read before the template changes")
        srv.set_rules(changed)
        read_eio(m, "stale", 3 * MiB, 4096, "read after the template changed")
    srv.mark()
    allow = TEMPLATE_CHANGED + [r"HTTP 503", r"cannot fetch"]
    with h.Mount(ws(), img, opts=("timeout=3",), allow=allow) as m:
        p = m.path("stale")
        x = xattrs(p)
        if x["state"] != "error" or "template changed" not in x["error"]:
            fail(f"after a remount: state {x['state']!r}, error {x['error']!r}; expected "
                 "state error naming the template change")
        elapsed = read_eio(m, "stale", 3 * MiB, 4096, "absent read after the remount")
        if elapsed > 1:
            fail(f"an absent read after the remount took {elapsed:.1f} s to fail")
        expect_equal("present data after the remount", pread_direct(p, *present),
                     t.read(*present))
        if srv.records(f"/{t.name}"):
            fail(f"the remount or its reads asked the changed template:\n"
                 f"{show(srv.records(f'/{t.name}'))}")
        # The server is down: start cannot tell, says so, and changes nothing.
        srv.set_rules([rule("status", t, status=503)])
        e, reply = h.control_send(m.mnt, "start stale\n")
        if e != errno.EIO or "cannot check the template of stale" not in reply \
                or "503" not in reply:
            fail(f"start while the server answers 503: errno {e}, reply {reply!r}")
        x = xattrs(p)
        if x["state"] != "error" or "template changed" not in x["error"]:
            fail(f"after a start that could not check: state {x['state']!r}, "
                 f"error {x['error']!r}; expected the template change kept")
        srv.set_rules(changed)
        srv.mark()
        e, reply = h.control_send(m.mnt, "start stale\n")
        if e != errno.EIO or "still differs" not in reply:
            fail(f"start while the template differs: errno {e}, reply {reply!r}")
        if xattr(p, "state") != "error":
            fail(f"state {xattr(p, 'state')!r} after a start that found the change")
        check_validator_sent(srv.records(f"/{t.name}"))
        # The template is the one added again (a server restored from backup).
        srv.clear()
        e, reply = h.control_send(m.mnt, "start stale\n")
        if e or reply != "ok\n":
            fail(f"start once the template is back: errno {e}, reply {reply!r}")
        x = xattrs(p)
        if x["error"] or x["state"] not in ("streaming", "complete"):
            fail(f"after a start that found the template back: state {x['state']!r}, "
                 f"error {x['error']!r}")
        h.wait_until(lambda: xattr(p, "state") == "complete", 60, "stale: complete")
    with h.Mount(ws(), img) as m:
        x = xattrs(m.path("stale"))
        if x["state"] != "complete" or x["error"]:
            fail(f"after the last remount: state {x['state']!r}, error {x['error']!r}")
    check_image_region(img, "stale", t, 0, t.size, "stale, once back")


def test_whole_new_template_in_a_200_is_template_change():
    """A cache that ignores If-Match and Range answers 200 with a template
    whose ETag changed: a template change (state error at once), not a
    server that cannot do ranges (retried until timeout)."""
    t, srv, img = setup("replaced")
    with h.Mount(ws(), img, opts=("stream=manual", "timeout=10"), allow=TEMPLATE_CHANGED) as m:
        p = m.path("replaced")
        read_ok(m, "replaced", t, 0, 64 * KiB, "read before the template is replaced")
        srv.set_rules([rule("replaced", t)])
        elapsed = read_eio(m, "replaced", 3 * MiB, 64 * KiB, "read after the template changed")
        if elapsed > 5:
            fail(f"EIO took {elapsed:.1f} s: a changed template is not worth retrying")
        x = xattrs(p)
        if x["state"] != "error" or "template changed" not in x["error"]:
            fail(f"after a 200 with a new ETag: state {x['state']!r}, error {x['error']!r}; "
                 "expected state error and 'template changed'")
        h.log(f"replaced: EIO after {elapsed:.2f} s, error {x['error']!r}")
    check_image_region(img, "replaced", t, 0, CHUNK, "replaced")
    check_image_zero(img, "replaced", CHUNK, t.size - CHUNK, "replaced")


def test_persistent_503_eio_after_timeout():
    t, srv, img = setup("down")
    off, length = 1 * MiB, 64 * KiB
    srv.set_rules([rule("status", t, status=503)])
    allow = [r"HTTP 503", r"cannot fetch"]
    with h.Mount(ws(), img, opts=("stream=manual", "timeout=3"), allow=allow) as m:
        p = m.path("down")
        elapsed = read_eio(m, "down", off, length, "read with a persistent 503", timeout=30)
        if not 2.5 <= elapsed <= 10:
            fail(f"EIO after {elapsed:.2f} s with timeout=3, expected 2.5-10 s")
        recs = srv.records(f"/{t.name}")
        if len(recs) < 3 or any(r["status"] != 503 for r in recs):
            fail(f"expected several retried 503s:\n{show(recs)}")
        x = xattrs(p)
        if x["state"] == "error":
            fail("a server outage put the disk in state error (only a changed template should)")
        if "503" not in x["error"]:
            fail(f"user.streamfs.error does not mention the 503: {x['error']!r}")
        if int(x["errors"]) < len(recs):
            fail(f"user.streamfs.errors {x['errors']} < {len(recs)} failed requests")
        h.log(f"persistent 503: EIO after {elapsed:.2f} s, {len(recs)} requests, "
              f"error {x['error']!r}")
        # The outage ends: the same read now works.
        srv.clear()
        read_ok(m, "down", t, off, length, "read after the outage ended")
        x = xattrs(p)
        if x["error"]:
            fail(f"user.streamfs.error still {x['error']!r} after a successful fetch")
    check_image_region(img, "down", t, CHUNK, CHUNK, "persistent 503")


def test_streamer_resumes_by_itself():
    size = 6 * MiB + 5
    t, srv, img = setup("resume", size=size)
    srv.set_rules([rule("refuse", t)])
    allow = [r"streaming chunk \d+ failed", r"cannot fetch"]
    with h.Mount(ws(), img, allow=allow) as m:
        p = m.path("resume")
        reply = control(m, "start resume\n")
        h.log(f"start: {reply.strip()!r}")
        time.sleep(4)
        x = xattrs(p)
        if x["state"] != "streaming":
            fail(f"state {x['state']!r} while the template refuses, expected streaming "
                 f"(retrying)\nstderr:\n{m.stderr()}")
        if not x["error"]:
            fail("user.streamfs.error is empty while every request fails")
        if int(x["errors"]) < 3 or int(x["cached"]) != 0:
            fail(f"while refusing: errors {x['errors']}, cached {x['cached']}")
        refused = srv.records(f"/{t.name}")
        if any(r["fault"] != "refuse" for r in refused):
            fail(f"unexpected requests while refusing:\n{show(refused)}")
        if len(refused) > 100:
            fail(f"{len(refused)} requests in 4 s: the streamer does not back off")
        h.log(f"while refused: {len(refused)} requests in 4 s, error {x['error']!r}")

        srv.mark(settle=0)
        srv.clear()
        t0 = time.monotonic()
        h.wait_until(lambda: xattr(p, "state") == "complete", 60,
                     "the streamer to resume and complete the disk")
        h.log(f"complete {time.monotonic() - t0:.1f} s after the server recovered")
        x = xattrs(p)
        if int(x["cached"]) != size:
            fail(f"complete but cached {x['cached']} != {size}")
        if x["error"]:
            fail(f"user.streamfs.error still {x['error']!r} after the disk completed")
        got = h.sha256_file(p)
        if got != t.sha256:
            fail(f"sha256 through the mount {got} != template {t.sha256}")
        recs = srv.records(f"/{t.name}")
        good = [rec_range(r) for r in recs if is_good_fetch(r)]
        if h.overlapping(good):
            fail(f"chunks fetched twice after recovery: {h.overlapping(good)}")
        if not h.covered(good, 0, size - 1):
            fail(f"the log does not account for every byte:\n{show(recs)}")
    srv.stop()
    p = h.run(["cmp", os.path.join(img, "resume.img"), t.path], timeout=60)
    if p.returncode != 0:
        fail(f"local image differs from the template: {p.stdout_text.strip()}")


if __name__ == "__main__":
    h.main(globals())
