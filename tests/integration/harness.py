# SPDX-License-Identifier: MIT
"""Integration test harness for streamfs: real nginx, real FUSE mounts.

Standard library only (Python >= 3.11).  Test scripts import this module,
define test_* functions and end with ``harness.main(globals())``.

Environment (set by tests/meson.build; defaults suit a plain build/):
  STREAMFS_BIN, STREAMFSCTL_BIN   the binaries under test
  STREAMFS_SRC                    the source tree
  CI=true                         a missing prerequisite fails instead of
                                  skipping (exit 77), so green CI means the
                                  mount was really tested
  STREAMFS_TEST_KEEP=1            keep the workspace for post-mortems

Everything a test starts (nginx, streamfs daemons, helper servers, mounts,
immutable directories, bind mounts, the temporary workspace) is registered
and torn down in reverse order, after each test and again at exit, even
when a test fails or the script receives SIGTERM/SIGINT.  Processes are
only ever signalled by their own PID.
"""

import atexit
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

SRC = os.environ.get("STREAMFS_SRC") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STREAMFS = os.environ.get("STREAMFS_BIN") or os.path.join(SRC, "build", "streamfs")
STREAMFSCTL = os.environ.get("STREAMFSCTL_BIN") or os.path.join(SRC, "build", "streamfsctl")
IN_CI = os.environ.get("CI", "").lower() == "true"
KEEP = os.environ.get("STREAMFS_TEST_KEEP") == "1"

KiB = 1024
MiB = 1024 * 1024

MOUNT_TIMEOUT = 30.0      # seconds to wait for a mount to appear
EXIT_TIMEOUT = 15.0       # seconds for a daemon to exit after unmount
SERVER_TIMEOUT = 10.0     # seconds for a server to start or stop

# Lines in a daemon's stderr that always fail a test.
SANITIZER_PATTERNS = [
    re.compile(r"==\d+=="),
    re.compile(r"runtime error:"),
    re.compile(r"AddressSanitizer"),
    re.compile(r"LeakSanitizer"),
    re.compile(r"ThreadSanitizer"),
    re.compile(r"UndefinedBehaviorSanitizer"),
]
ERROR_LINE = re.compile(r"error", re.IGNORECASE)

os.umask(0o022)


class TestFailure(AssertionError):
    pass


def fail(msg):
    raise TestFailure(msg)


def log(msg):
    print(f"# {msg}", flush=True)


# --------------------------------------------------------------------------
# Cleanup registry
# --------------------------------------------------------------------------

_cleanups = []            # LIFO of (name, fn)
_cleanup_lock = threading.RLock()


def defer(fn, name=None):
    """Registers fn() to run at the end of the current test (and at exit).
    Returns a handle for cancel()."""
    entry = (name or getattr(fn, "__name__", "cleanup"), fn)
    with _cleanup_lock:
        _cleanups.append(entry)
    return entry


def cancel(entry):
    with _cleanup_lock:
        try:
            _cleanups.remove(entry)
        except ValueError:
            pass


def run_cleanups(keep=0):
    """Runs registered cleanups newest first down to `keep` entries.
    Returns a list of error strings (cleanup never raises)."""
    errors = []
    while True:
        with _cleanup_lock:
            if len(_cleanups) <= keep:
                break
            name, fn = _cleanups.pop()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - cleanup must go on
            errors.append(f"cleanup {name}: {type(e).__name__}: {e}")
    return errors


_final = []              # run after every cleanup: workspace removal


def _atexit_cleanup():
    errors = run_cleanups(0)
    while _final:
        try:
            _final.pop()()
        except BaseException as e:  # noqa: BLE001
            errors.append(f"final cleanup: {type(e).__name__}: {e}")
    for e in errors:
        print(f"# {e}", file=sys.stderr, flush=True)


atexit.register(_atexit_cleanup)


def _on_signal(signum, _frame):
    # Turn SIGTERM (meson's timeout) into SystemExit so that finally blocks
    # and atexit run and nothing stays mounted.
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)
# A shell's background job starts with SIGINT ignored, and children
# inherit that; libfuse then leaves SIGINT alone and a daemon under test
# would ignore it.  Catching it here resets it to default across exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------
# Prerequisites
# --------------------------------------------------------------------------

def check_prerequisites(extra_programs=()):
    """Exits 77 (meson SKIP) when something needed is missing, or 1 under
    CI=true, where a skip would hide an untested mount."""
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    for prog in ("fusermount3", "nginx", "qemu-img", "qemu-io", *extra_programs):
        if not find_program(prog):
            missing.append(prog)
    if missing:
        msg = "missing prerequisites: " + ", ".join(missing)
        if IN_CI:
            print(f"FAIL: {msg} (CI=true: not skipping)", flush=True)
            sys.exit(1)
        print(f"SKIP: {msg}", flush=True)
        sys.exit(77)
    for b in (STREAMFS, STREAMFSCTL):
        if not os.access(b, os.X_OK):
            print(f"FAIL: binary under test not found: {b} (build first)", flush=True)
            sys.exit(1)


def find_program(name):
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


# --------------------------------------------------------------------------
# Workspace and templates
# --------------------------------------------------------------------------

class Workspace:
    """A temporary directory under /tmp, world-readable so nginx workers
    (user nobody) can read templates.  Removed at exit."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="streamfs-it-", dir="/tmp")
        os.chmod(self.root, 0o755)
        self.www = self.mkdir("www")
        self._templates = {}
        self._n = 0
        _final.append(self._remove)

    def mkdir(self, *parts, unique=False):
        path = os.path.join(self.root, *parts)
        if unique:
            self._n += 1
            path = f"{path}-{self._n}"
        os.makedirs(path, exist_ok=not unique)
        os.chmod(path, 0o755)
        return path

    def template(self, name, size, seed=None):
        """Writes www/NAME with `size` pseudo-random bytes (deterministic
        per name/seed) once; returns a Template."""
        t = self._templates.get(name)
        if t is not None:
            if t.size != size:
                fail(f"template {name} requested with two sizes")
            return t
        path = os.path.join(self.www, name)
        rng = random.Random(seed if seed is not None else f"{name}:{size}")
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                block = rng.randbytes(n)
                h.update(block)
                f.write(block)
                left -= n
        os.chmod(path, 0o644)
        t = Template(name, path, size, h.hexdigest())
        self._templates[name] = t
        return t

    def _remove(self):
        if KEEP:
            print(f"# workspace kept: {self.root}", file=sys.stderr)
            return
        unmount_everything_under(self.root)
        # Undo chattr +i anywhere, or rmtree fails.
        subprocess.run(["chattr", "-R", "-i", self.root],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)


_workspace = None


def workspace():
    """The script's one Workspace, made on first use."""
    global _workspace
    if _workspace is None:
        _workspace = Workspace()
    return _workspace


def xattr(path, name):
    """The value of user.streamfs.NAME of path, as text."""
    return os.getxattr(path, "user.streamfs." + name).decode()


class Template:
    def __init__(self, name, path, size, sha256):
        self.name, self.path, self.size, self.sha256 = name, path, size, sha256

    def read(self, off=0, length=None):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(self.size - off if length is None else length)

    def __repr__(self):
        return f"Template({self.name}, {self.size})"


def sha256_file(path, bufsize=4 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return h.hexdigest()
            h.update(b)


def pread_all(path, off, length, flags=0):
    """Reads exactly length bytes (less only at EOF) with pread."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        out = bytearray()
        while len(out) < length:
            b = os.pread(fd, length - len(out), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def listdir_set(path):
    return set(os.listdir(path))


# --------------------------------------------------------------------------
# Mount table helpers
# --------------------------------------------------------------------------

def _unescape_mountinfo(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts():
    """Returns [(mount_point, fstype)] from /proc/self/mountinfo, without
    touching any mounted filesystem (a hung daemon cannot block us)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5:
                fstype = right.split()[0] if right else ""
                out.append((_unescape_mountinfo(fields[4]), fstype))
    return out


def is_mounted(path, fstype_prefix=None):
    path = os.path.realpath(path)
    for mp, fstype in mounts():
        if mp == path and (fstype_prefix is None or fstype.startswith(fstype_prefix)):
            return True
    return False


def unmount_everything_under(root):
    root = os.path.realpath(root)
    for mp, fstype in reversed(mounts()):
        if mp == root or mp.startswith(root + "/"):
            if fstype.startswith("fuse"):
                subprocess.run(["fusermount3", "-u", "-z", mp],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                subprocess.run(["umount", "-l", mp],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def run(cmd, timeout=120, check=False, input=None, **kw):
    """Runs cmd; returns CompletedProcess with text stdout/stderr."""
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input, **kw)
    p.stdout_text = p.stdout.decode(errors="replace") if isinstance(p.stdout, bytes) else p.stdout
    p.stderr_text = p.stderr.decode(errors="replace") if isinstance(p.stderr, bytes) else p.stderr
    if check and p.returncode != 0:
        fail(f"{cmd!r} exited {p.returncode}\nstdout: {p.stdout_text}\nstderr: {p.stderr_text}")
    return p


def ctl(*args, timeout=60, user=None):
    """Runs streamfsctl ARGS...; returns (rc, stdout, stderr) as text.
    user='nobody' runs it through setpriv with that user's ids."""
    cmd = [STREAMFSCTL, *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    p = run(cmd, timeout=timeout)
    for line in p.stderr_text.splitlines():
        if any(pat.search(line) for pat in SANITIZER_PATTERNS):
            fail(f"sanitizer report from {' '.join(cmd)}:\n{p.stderr_text}")
    return p.returncode, p.stdout_text, p.stderr_text


def ctl_add(image_dir, name, url, chunk_size=None):
    """streamfsctl add that must succeed."""
    args = ["add", image_dir, name, url]
    if chunk_size is not None:
        args += ["--chunk-size", chunk_size]
    rc, out, err = ctl(*args)
    if rc != 0:
        fail(f"streamfsctl {' '.join(map(str, args))} exited {rc}: {err.strip()}")
    return out, err


def stderr_lines(text):
    return [l for l in text.splitlines() if l.strip()]


def wait_for_pid_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def free_port():
    """A port that was free a moment ago (nginx cannot listen on :0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClosedPort:
    """A bound, non-listening socket: connections to its port are refused,
    and no other process can take the port while we hold it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        defer(self.close, "closed port")

    def close(self):
        self.sock.close()


def wait_port(port, proc, timeout=SERVER_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# --------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------

ACCESS_RE = re.compile(
    r'^(?P<method>\S+) "(?P<uri>[^"]*)" "(?P<range>[^"]*)" (?P<status>\d+) '
    r'(?P<bytes>\d+) (?P<conn>\d+) (?P<time>[\d.]+)$')
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")


class Request:
    """One access-log record."""

    def __init__(self, method, uri, range_header, status, body_bytes, conn):
        self.method, self.uri, self.range = method, uri, range_header
        self.status, self.body_bytes, self.conn = status, body_bytes, conn

    def byte_range(self):
        """(first, last) inclusive from a simple 'bytes=a-b' Range, or None."""
        m = RANGE_RE.match(self.range)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def __repr__(self):
        return (f"<{self.method} {self.uri} range={self.range or '-'} "
                f"{self.status} {self.body_bytes}B>")


class Nginx:
    """A private nginx serving `root` on 127.0.0.1:PORT, with an access log
    recording method, URI, Range, status and body bytes per request."""

    def __init__(self, ws, root=None, port=None):
        self.ws = ws
        self.root = root or ws.www
        self.dir = ws.mkdir("nginx", unique=True)
        for d in ("tmp", "logs"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.access_log = os.path.join(self.dir, "logs", "access.log")
        self.error_log = os.path.join(self.dir, "logs", "error.log")
        self.pid_file = os.path.join(self.dir, "nginx.pid")
        self.proc = None
        self.port = port
        self._mark = 0
        self._cleanup = None

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def conf_preamble(self):
        """Everything of the config up to the server blocks: subclasses
        add their own servers after it and close the http block."""
        d = self.dir
        return f"""
worker_processes 1;
pid {self.pid_file};
error_log {self.error_log} info;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    types {{ }}
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    log_format streamfs '$request_method "$request_uri" "$http_range" $status '
                        '$body_bytes_sent $connection $request_time';
    access_log {self.access_log} streamfs;
"""

    def _write_conf(self, port):
        conf = self.conf_preamble() + f"""    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {self.root};
        location / {{ }}
    }}
}}
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def start(self, attempts=5):
        if self.proc is not None:
            fail("nginx already running")
        last_err = ""
        for _ in range(attempts if self.port is None else 1):
            port = self.port or free_port()
            self._write_conf(port)
            open(self.error_log, "a").close()
            err_start = os.path.getsize(self.error_log)
            proc = subprocess.Popen(
                [find_program("nginx"), "-p", self.dir, "-c", self.conf, "-e", self.error_log,
                 "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.dir, "logs", "stderr.log"), "ab"))
            if wait_port(port, proc) and proc.poll() is None:
                self.proc, self.port = proc, port
                self._cleanup = defer(self.stop, "nginx")
                return self
            if proc.poll() is None:
                self._terminate(proc)
            with open(self.error_log, errors="replace") as f:
                f.seek(err_start)
                last_err = f.read()
            if "in use" not in last_err:
                break
        fail(f"nginx did not start: {last_err.strip()}")

    @staticmethod
    def _terminate(proc):
        proc.send_signal(signal.SIGTERM)
        if wait_for_pid_exit(proc, SERVER_TIMEOUT) is None:
            # Never SIGKILL nginx (it would leave workers behind); give it
            # a second chance, then report.
            proc.send_signal(signal.SIGTERM)
            if wait_for_pid_exit(proc, SERVER_TIMEOUT) is None:
                fail(f"nginx pid {proc.pid} ignored SIGTERM")

    def stop(self):
        """Stops nginx (SIGTERM to the master's PID) and waits."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if self._cleanup:
            cancel(self._cleanup)
            self._cleanup = None
        self._terminate(proc)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- access log ---

    def _read_log(self):
        try:
            with open(self.access_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self, settle=0.3):
        """Forgets every request logged so far (after letting the log
        settle: nginx writes a line when a request finishes)."""
        self._settle(settle)
        self._mark = len(self._read_log())

    def _settle(self, settle):
        # The client may have its bytes before nginx logs the request:
        # wait until the log stops growing.
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            n = len(self._read_log())
            if n != last:
                last, stable_since = n, time.monotonic()
            elif time.monotonic() - stable_since >= settle:
                return
            time.sleep(0.05)

    def records(self, settle=0.3, uri=None):
        """Requests logged since the last mark(), oldest first."""
        if settle:
            self._settle(settle)
        out = []
        for line in self._read_log()[self._mark:].splitlines():
            m = ACCESS_RE.match(line)
            if not m:
                fail(f"unparsable access log line: {line!r}")
            r = Request(m["method"], m["uri"], "" if m["range"] == "-" else m["range"],
                        int(m["status"]), int(m["bytes"]), int(m["conn"]))
            if uri is None or r.uri == uri or r.uri == "/" + uri:
                out.append(r)
        return out


def total_bytes(records):
    return sum(r.body_bytes for r in records)


def ranges_of(records):
    """Inclusive (first, last) of each record with a simple Range header;
    fails on a GET without one (a whole-template download)."""
    out = []
    for r in records:
        br = r.byte_range()
        if br is None:
            if r.method == "GET":
                fail(f"request without a simple Range header: {r!r}")
            continue
        out.append(br)
    return out


def overlapping(ranges):
    """Pairs of overlapping inclusive ranges."""
    s = sorted(ranges)
    return [(a, b) for a, b in zip(s, s[1:]) if b[0] <= a[1]]


def covered(ranges, first, last):
    """True when the union of inclusive ranges covers [first, last]."""
    pos = first
    for a, b in sorted(ranges):
        if a > pos:
            break
        pos = max(pos, b + 1)
        if pos > last:
            return True
    return pos > last


def check_chunk_aligned(ranges, chunk, size):
    """Every range covers whole chunks, or is half of a reader-first pair:
    a run [s, e] of whole chunks fetched as [p, e] and [s, p - 1], p on a
    4 KiB boundary inside it (streamfs(1), Chunks)."""
    have = set(ranges)

    def edge(x):
        return x % chunk == 0 or x == size

    for a, b in ranges:
        if edge(a) and edge(b + 1):
            continue
        if a % 4096 == 0 and edge(b + 1) and \
                any(e == a - 1 and edge(s) for s, e in have):
            continue
        if (b + 1) % 4096 == 0 and edge(a) and \
                any(s == b + 1 and edge(e + 1) for s, e in have):
            continue
        fail(f"range {a}-{b} is not chunk-aligned (chunk {chunk}, size {size}), nor half "
             "of a reader-first pair")


# --------------------------------------------------------------------------
# Small Python HTTP server for behaviours nginx will not show
# --------------------------------------------------------------------------

_PYSERVER = r'''
import http.server, sys, os
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, fmt, *args):
        with open(LOG, "a") as f:
            f.write("%s \"%s\" \"%s\"\n" % (self.command, self.path, self.headers.get("Range", "")))
    def send_head(self):
        # Ignore Range on purpose (RFC 9110 14.2: a server MAY ignore it
        # and answer 200 with the whole representation).
        return super().send_head()
LOG = sys.argv[2]
os.chdir(sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
'''


class RangeIgnoringServer:
    """Serves `root` with Python's http.server, answering every GET with
    200 and the whole file whatever the Range header says."""

    def __init__(self, ws, root=None):
        self.dir = ws.mkdir("pyserver", unique=True)
        self.root = root or ws.www
        self.log = os.path.join(self.dir, "requests.log")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _PYSERVER, self.root, self.log],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        self._cleanup = defer(self.stop, "python http.server")
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            fail("python http.server did not start")
        self.port = int(line)
        if not wait_port(self.port, self.proc):
            fail("python http.server does not answer")
        return self

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self):
        try:
            with open(self.log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def stop(self):
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        cancel(self._cleanup)
        proc.send_signal(signal.SIGTERM)
        if wait_for_pid_exit(proc, SERVER_TIMEOUT) is None:
            proc.kill()
            proc.wait()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# streamfs mounts
# --------------------------------------------------------------------------

class Mount:
    """streamfs -f -o OPTS IMAGE_DIR MNT, stderr captured to a file.

    start() waits until the mount appears (30 s, failing early if the
    daemon exits).  stop() runs `fusermount3 -u -z`, waits for the daemon
    (SIGTERM, then SIGKILL by PID after a timeout), expects exit code 0,
    and fails on sanitizer reports or on 'error' lines matching none of
    `allow` (regexes)."""

    _count = 0

    def __init__(self, ws, image_dir, opts=("stream=manual",), allow=(), mnt=None):
        Mount._count += 1
        self.ws = ws
        self.image_dir = image_dir
        self.opts = list(opts)
        self.allow = [re.compile(a) if isinstance(a, str) else a for a in allow]
        self.mnt = mnt or ws.mkdir(f"mnt-{Mount._count}")
        self.stderr_path = os.path.join(ws.root, f"streamfs-{Mount._count}.stderr")
        self.proc = None
        self.returncode = None
        self._cleanup = None
        self._stderr_file = None

    def cmdline(self):
        cmd = [STREAMFS, "-f"]
        if self.opts:
            cmd += ["-o", ",".join(self.opts)]
        return cmd + [self.image_dir, self.mnt]

    def path(self, name):
        return os.path.join(self.mnt, name)

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, timeout=MOUNT_TIMEOUT):
        if self.proc is not None:
            fail("mount already started")
        self._stderr_file = open(self.stderr_path, "ab")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
        env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        self.proc = subprocess.Popen(self.cmdline(), stdin=subprocess.DEVNULL,
                                     stdout=self._stderr_file, stderr=self._stderr_file,
                                     env=env)
        self.returncode = None
        self._cleanup = defer(lambda: self.stop(check=False), "streamfs mount")
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt, "fuse"):
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                self.proc = None
                cancel(self._cleanup)
                self._stderr_file.close()
                fail(f"streamfs exited {rc} before mounting: {self.cmdline()}\n"
                     f"stderr:\n{self.stderr()}")
            if time.monotonic() > deadline:
                fail(f"streamfs did not mount {self.mnt} within {timeout} s\n"
                     f"stderr:\n{self.stderr()}")
            time.sleep(0.02)
        return self

    def wait_exit(self, timeout=EXIT_TIMEOUT):
        """Waits for the daemon to exit; returns its code or None."""
        rc = wait_for_pid_exit(self.proc, timeout)
        if rc is not None:
            self.returncode = rc
        return rc

    def stop(self, check=True, expect_rc=0):
        """Unmounts and reaps the daemon; returns its exit code.  With
        check, fails on a bad exit code or suspicious stderr."""
        if self.proc is None:
            if check:
                self.check_stderr()
            return self.returncode
        if self._cleanup:
            cancel(self._cleanup)
            self._cleanup = None
        problems = []
        if is_mounted(self.mnt):
            p = run(["fusermount3", "-u", "-z", self.mnt], timeout=30)
            if p.returncode != 0:
                problems.append(f"fusermount3 -u -z failed: {p.stderr_text.strip()}")
        rc = self.wait_exit(EXIT_TIMEOUT)
        if rc is None:
            problems.append(f"streamfs pid {self.proc.pid} did not exit after unmount; SIGTERM")
            self.proc.send_signal(signal.SIGTERM)
            rc = self.wait_exit(5)
            if rc is None:
                problems.append("streamfs ignored SIGTERM; SIGKILL")
                self.proc.kill()
                rc = self.wait_exit(10)
        self.proc = None
        self._stderr_file.close()
        if is_mounted(self.mnt):
            run(["fusermount3", "-u", "-z", self.mnt])
            problems.append(f"{self.mnt} still mounted after the daemon exited")
        if check:
            if expect_rc is not None and rc != expect_rc:
                problems.append(f"streamfs exited {rc}, expected {expect_rc}")
            problems += self.stderr_problems()
            if problems:
                fail("; ".join(problems) + f"\nstderr of {self.cmdline()}:\n{self.stderr()}")
        return rc

    def stderr_problems(self):
        out = []
        for line in self.stderr().splitlines():
            if any(p.search(line) for p in SANITIZER_PATTERNS):
                out.append(f"sanitizer report: {line}")
            elif ERROR_LINE.search(line) and not any(a.search(line) for a in self.allow):
                out.append(f"unexpected error line: {line}")
        return out

    def check_stderr(self):
        problems = self.stderr_problems()
        if problems:
            fail("; ".join(problems) + f"\nstderr:\n{self.stderr()}")

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type, *exc):
        # When the body failed, report that failure, not a teardown one.
        self.stop(check=exc_type is None)


def wait_until(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    fail(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------
# Immutable directories (we run as root: chmod 0555 is not enough)
# --------------------------------------------------------------------------

def make_unwritable(path):
    """Makes directory `path` unwritable even for root: chattr +i, or else
    a read-only bind mount.  Undone at the end of the test.  Fails when
    neither works."""
    probe = os.path.join(path, ".probe")

    def writable():
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        except OSError:
            return False
        os.close(fd)
        os.unlink(probe)
        return True

    os.chmod(path, 0o555)
    if run(["chattr", "+i", path]).returncode == 0 and not writable():
        defer(lambda: run(["chattr", "-i", path]), "chattr -i")
        return "chattr +i"
    run(["chattr", "-i", path])
    if run(["mount", "--bind", path, path]).returncode == 0:
        defer(lambda: run(["umount", "-l", path]), "umount bind")
        if run(["mount", "-o", "remount,bind,ro", path]).returncode == 0 and not writable():
            return "read-only bind mount"
    fail(f"cannot make {path} unwritable for root")


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------

def main(namespace, extra_programs=()):
    """Runs the test_* functions of `namespace` in definition order (or
    those named on the command line), printing ok/FAIL lines and a final
    'N passed, N failed'.  Exit code 1 when any failed."""
    check_prerequisites(extra_programs)
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    wanted = sys.argv[1:]
    if wanted:
        unknown = set(wanted) - {n for n, _ in tests}
        if unknown:
            print(f"unknown tests: {', '.join(sorted(unknown))}")
            sys.exit(2)
        tests = [(n, f) for n, f in tests if n in wanted]
    passed = failed = 0
    base = len(_cleanups)
    for i, (name, fn) in enumerate(tests, 1):
        t0 = time.monotonic()
        err = None
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on
            err = traceback.format_exc()
        cleanup_errors = run_cleanups(base)
        if cleanup_errors and err is None:
            err = "\n".join(cleanup_errors)
        dt = time.monotonic() - t0
        if err is None:
            passed += 1
            print(f"ok {i} - {name} ({dt:.1f} s)", flush=True)
        else:
            failed += 1
            for line in err.rstrip().splitlines():
                print(f"# {line}")
            for line in cleanup_errors if err != "\n".join(cleanup_errors) else []:
                print(f"# {line}")
            print(f"FAIL {i} - {name} ({dt:.1f} s)", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


# --------------------------------------------------------------------------
# Refused mounts and the metadata format, shared by several tests
# --------------------------------------------------------------------------

def run_daemon_expect_failure(args, timeout=30):
    """Runs streamfs ARGS, which must fail without mounting; returns
    (rc, stderr).  A daemon that mounts instead is unmounted and fails
    the test."""
    mnt = args[-1]
    proc = subprocess.Popen([STREAMFS, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run(["fusermount3", "-u", "-z", mnt])
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        fail(f"streamfs {' '.join(args)} kept running for {timeout} s; expected a refusal")
    if is_mounted(mnt):
        run(["fusermount3", "-u", "-z", mnt])
        fail(f"streamfs {' '.join(args)} left {mnt} mounted")
    return proc.returncode, (out + err).decode(errors="replace")


# NAME.meta (cache/cache_i.h): two 4 KiB header slots, then the bitmap.
META_MAGIC = b"STRMFSMD"
META_SLOT = 4096
META_BITMAP_OFFSET = 2 * META_SLOT
META_FLAG_COMPLETE = 0x1


def crc32c(data):
    """CRC-32C (Castagnoli), as the metadata headers use."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def control_send(mnt, data):
    """Writes one command (str or bytes) to MNT/.control in one write and
    reads the reply on the same open file; returns (errno or 0, reply)."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(os.path.join(mnt, ".control"), os.O_RDWR)
    try:
        try:
            n = os.write(fd, data)
            e = 0 if n == len(data) else -1
        except OSError as ex:
            e = ex.errno
        reply = b""
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            reply += b
        return e, reply.decode(errors="replace")
    finally:
        os.close(fd)
