# SPDX-License-Identifier: MIT
"""TLS, extra headers, SigV4 and credential hygiene of streamfs mounts.

- TLS: a private CA and a server certificate for 127.0.0.1, generated with
  the openssl CLI; nginx serves the templates over https.  Verification is
  on by default (an unknown CA is refused with a clear reply), cafile=,
  capath= and insecure (with a warning) work, and a server that wants a
  client certificate gets one from cert=/key=.
- header_file=: a server that wants a bearer token; the file must be
  private (a group/world readable one refuses the mount); it is re-read
  when it changes, so a rotated token works without a remount.
- Credentials (URL userinfo, header_file tokens, the SigV4 secret) appear
  nowhere: xattrs, the control file's replies, streamfsctl status, the
  daemon's log (also with debug=all), error replies.
- aws_sigv4=/aws_credentials=: every request carries a valid AWS4-HMAC-SHA256
  signature (checked by a small Python server that recomputes it).

Disks are added through the mount's control file, which uses the mount's
TLS and header options.  Mounts use -o stream=manual,readahead=0 so that
only the reads a test makes fetch.

Run: python3 tests/integration/test_tls.py [test_name...]
(meson: meson test -C build --suite integration -v test_tls)
"""

import datetime
import errno
import hashlib
import hmac
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import harness as h
from harness import KiB, MiB, fail

_pki = None

TOKEN = "s3cr3t-token"
PASSWORD = "p4ssw0rd"
AWS_KEY_ID = "AKIDEXAMPLE"
AWS_SECRET = "wJalrSECRETKEY"
CHUNK = 64 * KiB
# Daemon log lines about failed adds/fetches that a test provokes on purpose.
FETCH_ERRORS = [r"(?i)certificate|TLS|SSL|verif|HTTP 40\d|access denied|denied|forbidden"]


ws = h.workspace


def template(name="tls.img", size=2 * MiB + 12345):
    return ws().template(name, size)


def image_dir():
    return ws().mkdir("images", unique=True)


def write_private(path, text, mode=0o600):
    """Writes `text` to `path` (created or truncated in place), then
    sets `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.chmod(path, mode)
    return path


def openssl(*args, cwd=None):
    return h.run(["openssl", *args], check=True, cwd=cwd)


# ---------------------------------------------------------------------------
# A private CA with a server and a client certificate
# ---------------------------------------------------------------------------

class Pki:
    """ca.pem/ca.key, server.pem/server.key (subjectAltName IP:127.0.0.1),
    client.pem/client.key (clientAuth), and capath/ (the CA, rehashed)."""

    def __init__(self, root):
        self.dir = root
        j = lambda n: os.path.join(root, n)  # noqa: E731
        self.ca, self.ca_key = j("ca.pem"), j("ca.key")
        self.server, self.server_key = j("server.pem"), j("server.key")
        self.client, self.client_key = j("client.pem"), j("client.key")
        self.capath = j("capath")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        openssl("req", "-x509", *ec, "-keyout", self.ca_key, "-out", self.ca, "-days", "2",
                "-subj", "/CN=streamfs test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self._leaf("server", "/CN=127.0.0.1",
                   "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        self._leaf("client", "/CN=streamfs test client",
                   "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n")
        os.mkdir(self.capath)
        shutil.copy(self.ca, os.path.join(self.capath, "streamfs-test-ca.pem"))
        if h.run(["openssl", "rehash", self.capath]).returncode != 0:
            h.run(["c_rehash", self.capath], check=True)
        if not any(re.fullmatch(r"[0-9a-f]{8}\.0", n) for n in os.listdir(self.capath)):
            fail(f"rehash made no hash link in {self.capath}: {os.listdir(self.capath)}")

    def _leaf(self, name, subj, ext):
        key, csr = os.path.join(self.dir, f"{name}.key"), os.path.join(self.dir, f"{name}.csr")
        extfile = os.path.join(self.dir, f"{name}.ext")
        with open(extfile, "w") as f:
            f.write(ext)
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", key, "-out", csr, "-subj", subj)
        os.chmod(key, 0o600)
        openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                "-CAcreateserial", "-out", os.path.join(self.dir, f"{name}.pem"),
                "-days", "2", "-extfile", extfile)


def pki():
    global _pki
    if _pki is None:
        _pki = Pki(ws().mkdir("pki"))
    return _pki


# ---------------------------------------------------------------------------
# nginx with our own server blocks (the harness's config has no TLS)
# ---------------------------------------------------------------------------

class ConfNginx(h.Nginx):
    """h.Nginx with server blocks of our own.  `servers(ports)` returns the
    server { } blocks; ports[0] is the port the harness waits for, the
    others (`extra_ports` of them) are picked here."""

    def __init__(self, ws_, servers, extra_ports=0):
        super().__init__(ws_)
        self.servers = servers
        self.extra_ports = extra_ports
        self.ports = []

    def _write_conf(self, port):
        if not (self.ports and self.ports[0] == port):  # a reload keeps the ports
            self.ports = [port] + [h.free_port() for _ in range(self.extra_ports)]
        conf = self.conf_preamble() + f"""{self.servers(self.ports)}
}}
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def reload(self, check):
        """Rewrites the config (same ports) and makes nginx re-read it
        (SIGHUP to the master's PID); waits until check() is true."""
        self._write_conf(self.ports[0])
        self.proc.send_signal(signal.SIGHUP)
        h.wait_until(check, 10, "nginx to load its new configuration")


def tls_servers(ports):
    p = pki()
    common = f"""
        ssl_certificate {p.server};
        ssl_certificate_key {p.server_key};
        server_name localhost;
        root {ws().www};
        location / {{ }}"""
    return f"""
    server {{
        listen 127.0.0.1:{ports[0]} ssl;{common}
    }}
    server {{
        listen 127.0.0.1:{ports[1]} ssl;{common}
        ssl_verify_client on;
        ssl_client_certificate {p.ca};
    }}"""


def https_nginx():
    """nginx serving ws().www over https on ports[0], and on ports[1] only
    to clients with a certificate from our CA."""
    pki()
    return ConfNginx(ws(), tls_servers, extra_ports=1).start()


# ---------------------------------------------------------------------------
# Control file, mounts that must be refused, cmp
# ---------------------------------------------------------------------------

control_send = h.control_send


def control_ok(mnt, line):
    e, reply = control_send(mnt, line)
    if e != 0 or reply.startswith("error") or not reply.endswith("\n"):
        fail(f"control {line.strip()!r}: errno {e}, reply {reply!r}")
    return reply


def add_ok(m, name, url, chunk_size="64K"):
    return control_ok(m.mnt, f"add {name} {url} chunk_size={chunk_size}\n")


def add_refused(m, name, url, pattern, what):
    """`add` through the control file must fail with a reply matching
    `pattern`, leave no disk in the mount nor files in the image dir."""
    before = h.listdir_set(m.image_dir)
    e, reply = control_send(m.mnt, f"add {name} {url} chunk_size=64K\n")
    problems = []
    if e == 0:
        problems.append("the write succeeded")
    if not reply.startswith("error: "):
        problems.append("the reply does not start with 'error: '")
    elif pattern and not re.search(pattern, reply):
        problems.append(f"the reply does not match {pattern!r}")
    if reply.count("\n") != 1 or not reply.endswith("\n"):
        problems.append("the reply is not one line")
    if os.path.exists(m.path(name)):
        problems.append(f"{name} appeared in the mount")
    if h.listdir_set(m.image_dir) != before:
        problems.append(f"files left in the image dir: "
                        f"{sorted(h.listdir_set(m.image_dir) - before)}")
    if problems:
        fail(f"{what}: {'; '.join(problems)}; errno {e}, reply {reply!r}")
    h.log(f"{what}: errno {errno.errorcode.get(e, e)}: {reply.strip()}")
    return reply


def expect_cmp(disk, t):
    p = h.run(["cmp", disk, t.path], timeout=60)
    if p.returncode != 0:
        fail(f"cmp {disk} {t.path}: {(p.stdout_text + p.stderr_text).strip()}")


def expect_mount_refused(img, opts, pattern, what, secrets=()):
    """streamfs -f -o OPTS must exit non-zero without mounting, printing
    one line that matches `pattern` and holds none of `secrets`."""
    mnt = ws().mkdir("mnt-refused", unique=True)
    args = ["-f", "-o", ",".join(opts), img, mnt]
    rc, text = h.run_daemon_expect_failure(args, timeout=20)
    lines = h.stderr_lines(text)
    problems = []
    if rc == 0:
        problems.append("exit code 0")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines of output, expected one")
    elif not re.search(pattern, lines[0]):
        problems.append(f"the message does not match {pattern!r}")
    for s in secrets:
        if s in text:
            problems.append(f"the output shows the secret {s!r}")
    if problems:
        fail(f"{what}: {'; '.join(problems)}; rc {rc}, output {text!r}")
    h.log(f"{what}: rc {rc}: {lines[0]}")


def user_xattrs(path):
    out = {}
    for n in os.listxattr(path):
        if n.startswith("user.streamfs."):
            out[n] = os.getxattr(path, n).decode(errors="replace")
    return out


def outputs_of_mount(m, names):
    """Everything a user can see about the disks `names` of mount m:
    xattrs, the control file's status replies, streamfsctl status."""
    outs = []
    for name in names:
        for k, v in user_xattrs(m.path(name)).items():
            outs.append((f"xattr {k} of {name}", v))
        e, reply = control_send(m.mnt, f"status {name}\n")
        outs.append((f"control 'status {name}' reply", reply))
    e, reply = control_send(m.mnt, "status\n")
    outs.append(("control 'status' reply", reply))
    for args in (["status", m.mnt], ["status", "--json", m.mnt]):
        rc, out, err = h.ctl(*args)
        outs.append((f"streamfsctl {' '.join(args)} (rc {rc})", out + err))
    return outs


def check_no_secret(outputs, secrets):
    leaks = [f"{s!r} in {what}: {text!r}" for what, text in outputs for s in secrets
             if s in text]
    if leaks:
        fail("credentials shown:\n  " + "\n  ".join(leaks))
    h.log(f"checked {len(outputs)} outputs for {len(secrets)} secrets: none shown")


VERIFY_FAILED = r"(?i)(certificate|TLS|SSL).*verif|verif.*(certificate|TLS|SSL)"


# ---------------------------------------------------------------------------
# 1. TLS
# ---------------------------------------------------------------------------

def test_tls_verified_by_default():
    t = template()
    with https_nginx() as ng:
        url = f"https://127.0.0.1:{ng.ports[0]}/{t.name}"
        with h.Mount(ws(), image_dir(), allow=FETCH_ERRORS) as m:
            ng.mark()
            reply = add_refused(m, "untrusted", url, VERIFY_FAILED,
                                "add over https from an unknown CA, no cafile")
            if not re.search(r"(?i)certificate", reply):
                fail(f"the reply does not say it is the certificate: {reply!r}")
            if ng.records(uri=t.name):
                fail(f"a request reached nginx despite the failed verification: "
                     f"{ng.records(uri=t.name)}")
            if h.listdir_set(m.mnt) - {".control"}:
                fail(f"the mount lists {sorted(h.listdir_set(m.mnt))}")


def test_tls_cafile():
    t = template()
    with https_nginx() as ng:
        url = f"https://127.0.0.1:{ng.ports[0]}/{t.name}"
        with h.Mount(ws(), image_dir(), opts=["stream=manual", "readahead=0", f"cafile={pki().ca}"],
                     allow=FETCH_ERRORS) as m:
            add_ok(m, "viaca", url)
            expect_cmp(m.path("viaca"), t)
            rec = [r for r in ng.records(uri=t.name) if r.status not in (200, 206)]
            if rec:
                fail(f"failed requests: {rec}")
            # The certificate names 127.0.0.1 only: the same server under
            # another name must fail host verification.
            add_refused(m, "wronghost", f"https://localhost:{ng.ports[0]}/{t.name}",
                        r"(?i)certificate|TLS|SSL|host|name",
                        "add over https with a name the certificate does not hold")


def test_tls_capath():
    t = template()
    with https_nginx() as ng:
        url = f"https://127.0.0.1:{ng.ports[0]}/{t.name}"
        with h.Mount(ws(), image_dir(), opts=["stream=manual", "readahead=0", f"capath={pki().capath}"]) as m:
            add_ok(m, "viapath", url)
            expect_cmp(m.path("viapath"), t)


def test_tls_insecure_warns():
    t = template()
    with https_nginx() as ng:
        url = f"https://127.0.0.1:{ng.ports[0]}/{t.name}"
        with h.Mount(ws(), image_dir(), opts=["stream=manual", "readahead=0", "insecure"]) as m:
            warn = [l for l in m.stderr().splitlines()
                    if re.search(r"(?i)verif|insecure", l)
                    and re.search(r"(?i)\boff\b|disabled|not verif|insecure|no tls", l)]
            if not warn:
                fail(f"no warning about TLS verification being off at mount; stderr:\n"
                     f"{m.stderr()}")
            h.log(f"insecure warning: {warn[0]}")
            add_ok(m, "insecure", url)
            expect_cmp(m.path("insecure"), t)


def test_tls_client_certificate():
    t = template()
    p = pki()
    with https_nginx() as ng:
        url = f"https://127.0.0.1:{ng.ports[1]}/{t.name}"
        with h.Mount(ws(), image_dir(), opts=["stream=manual", "readahead=0", f"cafile={p.ca}"],
                     allow=FETCH_ERRORS) as m:
            add_refused(m, "nocert", url, r"(?i)HTTP 400|certificate|TLS|SSL|denied|handshake",
                        "add from a server that wants a client certificate, without cert=")
        opts = ["stream=manual", "readahead=0", f"cafile={p.ca}", f"cert={p.client}", f"key={p.client_key}"]
        with h.Mount(ws(), image_dir(), opts=opts) as m:
            ng.mark()
            add_ok(m, "withcert", url)
            expect_cmp(m.path("withcert"), t)
            bad = [r for r in ng.records(uri=t.name) if r.status not in (200, 206)]
            if bad:
                fail(f"requests refused despite the client certificate: {bad}")


# ---------------------------------------------------------------------------
# 2. header_file
# ---------------------------------------------------------------------------

class TokenNginx(ConfNginx):
    """Plain http; every request must carry `Authorization: Bearer TOKEN`."""

    def __init__(self, ws_, token):
        self.token = token
        super().__init__(ws_, self._servers)

    def _servers(self, ports):
        return f"""
    server {{
        listen 127.0.0.1:{ports[0]};
        server_name localhost;
        root {ws().www};
        location / {{
            if ($http_authorization != "Bearer {self.token}") {{ return 403; }}
        }}
    }}"""

    def status_with(self, name, token):
        req = urllib.request.Request(self.url(name), headers={
            "Authorization": f"Bearer {token}", "Range": "bytes=0-0"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def rotate(self, name, token):
        old, self.token = self.token, token
        self.reload(lambda: self.status_with(name, token) == 206
                    and self.status_with(name, old) == 403)


def settle(disk, quiet=0.5, timeout=15):
    """Waits until nothing is fetched for the disk any more (readahead
    done): user.streamfs.fetched unchanged for `quiet` seconds and no
    read waiting."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = (os.getxattr(disk, "user.streamfs.fetched"),
               os.getxattr(disk, "user.streamfs.waiting"))
        if now != last:
            last, since = now, time.monotonic()
        elif now[1] == b"0" and time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
    fail(f"{disk} kept fetching for {timeout} s")


def cold_read_after_rotation(ng, t, d, off, length, how):
    ng.mark()
    cached = int(os.getxattr(d, "user.streamfs.cached"))
    if h.pread_all(d, off, length) != t.read(off, length):
        fail(f"a cold read after the token was rotated ({how}) returned wrong data")
    recs = ng.records(uri=t.name)
    if int(os.getxattr(d, "user.streamfs.cached")) <= cached:
        fail(f"the read at {off} after rotation ({how}) was not cold")
    if not h.covered(h.ranges_of(recs), off, off + length - 1):
        fail(f"after rotation ({how}): the requests {recs} do not cover the read")
    if any(r.status != 206 for r in recs):
        fail(f"after rotation ({how}): requests {recs}")
    settle(d)


def test_header_file_and_rotation():
    t = template("rot.img", 32 * MiB + 4321)
    hf = write_private(os.path.join(ws().mkdir("hdr", unique=True), "headers"),
                       f"# streamfs test\n\nAuthorization: Bearer {TOKEN}\n")
    with TokenNginx(ws(), TOKEN).start() as ng:
        with h.Mount(ws(), image_dir(), opts=["stream=manual", "readahead=0", f"header_file={hf}"]) as m:
            add_ok(m, "tok", ng.url(t.name))
            d = m.path("tok")
            if h.pread_all(d, 0, 100 * KiB) != t.read(0, 100 * KiB):
                fail("data read with the header_file token differ")
            settle(d)
            if any(r.status != 206 for r in ng.records(uri=t.name)):
                fail(f"requests refused: {ng.records(uri=t.name)}")

            # Rotation 1: the file rewritten in place.  (Reads far apart:
            # sequential readers get 8 MiB of readahead.)
            ng.rotate(t.name, "r0tated-t0ken-1")
            write_private(hf, "Authorization: Bearer r0tated-t0ken-1\n")
            cold_read_after_rotation(ng, t, d, 12 * MiB + 17, 3 * CHUNK, "file rewritten in place")

            # Rotation 2: a new file renamed over the old one (how secret
            # stores usually swap tokens).
            ng.rotate(t.name, "r0tated-t0ken-2")
            tmp = write_private(hf + ".new", "Authorization: Bearer r0tated-t0ken-2\n")
            os.rename(tmp, hf)
            cold_read_after_rotation(ng, t, d, 24 * MiB, 2 * CHUNK, "new file renamed over")
            expect_cmp(d, t)
        check_no_secret([("daemon stderr", m.stderr())],
                        [TOKEN, "r0tated-t0ken-1", "r0tated-t0ken-2"])


def daemon_pids(mnt):
    """PIDs of streamfs daemons whose command line names mnt."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if mnt.encode() in argv and os.path.basename(argv[0]) == b"streamfs":
                pids.append(int(pid))
    return pids


def test_relative_header_file_after_daemonizing():
    """Without -f the daemon changes to "/" once it is mounted: a
    header_file named relative to where streamfs was started must still
    be re-read there when the token rotates."""
    t = template("bg.img", 8 * MiB)
    hdir = ws().mkdir("hdr", unique=True)
    hf = write_private(os.path.join(hdir, "headers"), f"Authorization: Bearer {TOKEN}\n")
    img, mnt = image_dir(), ws().mkdir("mnt-bg", unique=True)
    out = os.path.join(ws().root, "streamfs-bg.out")

    def unmount():
        pids = daemon_pids(mnt)
        if h.is_mounted(mnt):
            h.run(["fusermount3", "-u", "-z", mnt], timeout=30)
        end = time.monotonic() + 30
        for pid in pids:
            while time.monotonic() < end and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)

    with TokenNginx(ws(), TOKEN).start() as ng:
        with open(out, "wb") as f:
            p = subprocess.run([h.STREAMFS, "-o", "stream=manual,readahead=0,timeout=5,"
                                "header_file=headers", img, mnt], cwd=hdir,
                               stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=60)
        cleanup = h.defer(unmount, "daemonized streamfs")
        if p.returncode != 0 or not h.is_mounted(mnt, "fuse"):
            fail(f"streamfs without -f exited {p.returncode}, mounted: "
                 f"{h.is_mounted(mnt)}\n{open(out, errors='replace').read()}")
        m = type("M", (), {"mnt": mnt, "image_dir": img})
        add_ok(m, "bg", ng.url(t.name))
        d = os.path.join(mnt, "bg")
        if h.pread_all(d, 0, 100 * KiB) != t.read(0, 100 * KiB):
            fail("data read with the header_file token differ")
        settle(d)
        ng.rotate(t.name, "r0tated-t0ken-3")
        write_private(hf, "Authorization: Bearer r0tated-t0ken-3\n")
        cold_read_after_rotation(ng, t, d, 4 * MiB, 2 * CHUNK, "daemonized, relative path")
        h.cancel(cleanup)
        unmount()
        if h.is_mounted(mnt) or daemon_pids(mnt):
            fail("the daemonized streamfs did not stop after fusermount3 -u")


def test_header_file_must_be_private():
    img = image_dir()
    d = ws().mkdir("hdr", unique=True)
    hf = write_private(os.path.join(d, "headers"), f"Authorization: Bearer {TOKEN}\n",
                       mode=0o644)
    for mode in (0o644, 0o640, 0o604):
        os.chmod(hf, mode)
        expect_mount_refused(img, ["stream=manual", "readahead=0", f"header_file={hf}"],
                             r"(?i)header.*(group|other|world|mode|permission|readable|600)",
                             f"header_file with mode {mode:04o}", secrets=[TOKEN])
    expect_mount_refused(img, ["stream=manual", "readahead=0", f"header_file={hf}.missing"],
                         r"(?i)header.*(No such file|missing|not found|cannot)",
                         "a missing header_file")
    if h.listdir_set(img):
        fail(f"refused mounts left files in the image dir: {sorted(h.listdir_set(img))}")


# ---------------------------------------------------------------------------
# 3. Credentials never shown
# ---------------------------------------------------------------------------

class BasicAuthNginx(ConfNginx):
    """Plain http with auth_basic (user / PASSWORD), and an X-Auth-Token
    header that must equal TOKEN."""

    def __init__(self, ws_):
        self.htpasswd = os.path.join(ws_.mkdir("htpasswd", unique=True), "htpasswd")
        self.set_password(PASSWORD)
        super().__init__(ws_, self._servers)

    def set_password(self, password):
        # nginx reads the file on every request: no reload needed.
        p = h.run(["openssl", "passwd", "-apr1", password], check=True)
        with open(self.htpasswd, "w") as f:
            f.write(f"user:{p.stdout_text.strip()}\n")
        os.chmod(self.htpasswd, 0o644)  # read by the nginx worker (nobody)

    def _servers(self, ports):
        return f"""
    server {{
        listen 127.0.0.1:{ports[0]};
        server_name localhost;
        root {ws().www};
        location / {{
            auth_basic "streamfs test";
            auth_basic_user_file {self.htpasswd};
            if ($http_x_auth_token != "{TOKEN}") {{ return 403; }}
        }}
    }}"""


class TraceMount(h.Mount):
    """A mount run with -d (FUSE's request trace, every debug message)."""

    def cmdline(self):
        cmd = super().cmdline()
        return cmd[:1] + ["-d"] + cmd[1:]


def test_credentials_never_shown():
    t = template("rot.img", 32 * MiB + 4321)
    t2 = template("tls2.img", 1 * MiB + 333)
    query = "qu3ry-s3cret"
    hf = write_private(os.path.join(ws().mkdir("hdr", unique=True), "headers"),
                       f"X-Auth-Token: {TOKEN}\n")
    secrets = [PASSWORD, TOKEN, "wr0ngP4ss"]
    outputs = []
    with BasicAuthNginx(ws()).start() as ng:
        base = f"127.0.0.1:{ng.port}"
        url = f"http://user:{PASSWORD}@{base}/{t.name}?sig={query}"
        url2 = f"http://user:{PASSWORD}@{base}/{t2.name}"
        opts = ["stream=manual", "readahead=0", f"header_file={hf}", "debug=all", "timeout=3"]
        with h.Mount(ws(), image_dir(), opts=opts, allow=FETCH_ERRORS + [
                r"(?i)exists|invalid|bad|name|not found|timed out|EIO|I/O"]) as m:
            outputs.append(("add reply", add_ok(m, "cred", url)))
            d = m.path("cred")
            if h.pread_all(d, 3 * CHUNK + 5, 2 * CHUNK) != t.read(3 * CHUNK + 5, 2 * CHUNK):
                fail("data through a URL with userinfo differ")
            control_ok(m.mnt, "chunk cred 0\n")
            rc, out, err = h.ctl("add", m.mnt, "cred2", url2, "--chunk-size", "64K")
            outputs.append((f"streamfsctl add through the mount (rc {rc})", out + err))
            if rc != 0:
                fail(f"streamfsctl add {m.mnt} cred2 URL exited {rc}: {err!r}")
            control_ok(m.mnt, "start cred2\n")
            rc, out, err = h.ctl("wait", m.path("cred2"), "--timeout", 30)
            outputs.append((f"streamfsctl wait (rc {rc})", out + err))
            expect_cmp(m.path("cred2"), t2)

            tmpl = os.getxattr(d, "user.streamfs.template").decode()
            if "user" in tmpl.split("//", 1)[-1].split("/", 1)[0] or "@" in tmpl:
                fail(f"user.streamfs.template keeps the userinfo: {tmpl!r}")
            if query in tmpl:
                fail(f"user.streamfs.template keeps the query string: {tmpl!r}")

            # Failing commands whose arguments hold credentials.
            wrong = f"http://user:wr0ngP4ss@{base}/{t.name}"
            for what, line in (
                    ("add with a wrong password", f"add bad {wrong} chunk_size=64K\n"),
                    ("add of a taken name", f"add cred {url}\n"),
                    ("add with a bad name", f"add .bad {url}\n"),
                    ("add with a bad chunk size", f"add cs {url} chunk_size=3K\n"),
                    ("add of a missing template",
                     f"add gone http://user:{PASSWORD}@{base}/missing.img\n"),
                    ("add with a trailing argument", f"add extra {url} bogus=1\n")):
                e, reply = control_send(m.mnt, line)
                if e == 0:
                    fail(f"{what}: the write succeeded; reply {reply!r}")
                outputs.append((f"error reply of {what}", reply))
                h.log(f"{what}: {reply.strip()}")
            rc, out, err = h.ctl("add", m.mnt, "bad2", wrong)
            outputs.append((f"streamfsctl add with a wrong password (rc {rc})", out + err))
            if rc == 0:
                fail("streamfsctl add with a wrong password succeeded")
            for n in ("bad", "bad2", "gone", "cs", "extra"):
                if os.path.exists(m.path(n)):
                    fail(f"a refused add left disk {n} in the mount")

            # The password stops working: demand reads fail, and the
            # error the disk shows must not hold the old one either.
            settle(d)
            ng.set_password("an0ther-pass")
            try:
                h.pread_all(d, 20 * MiB, CHUNK)
                fail("a cold read succeeded although the server refuses the password")
            except OSError as e:
                if e.errno != errno.EIO:
                    fail(f"a cold read the server refuses failed with {e!r}, expected EIO")
            err_x = os.getxattr(d, "user.streamfs.error").decode()
            h.log(f"user.streamfs.error after 401s: {err_x!r}")
            if not err_x:
                fail("user.streamfs.error is empty after a failed read")
            outputs += outputs_of_mount(m, ["cred", "cred2"])
        outputs.append(("daemon stderr (-f -o debug=all)", m.stderr()))
        meta = os.path.join(m.image_dir, "cred.meta")
        if os.stat(meta).st_mode & 0o077:
            fail(f"{meta} has mode {os.stat(meta).st_mode & 0o777:o}, expected 0600")
        # Once more with -d: FUSE's request trace and every debug message.
        ng.set_password(PASSWORD)
        with TraceMount(ws(), image_dir(), opts=["stream=manual", "readahead=0", f"header_file={hf}"],
                        allow=FETCH_ERRORS + [r"(?i)exists", r"^streamfs: debug: "]) as m:
            add_ok(m, "cred", url)
            if h.pread_all(m.path("cred"), 0, CHUNK) != t.read(0, CHUNK):
                fail("data through a URL with userinfo differ (-d)")
            for line in (f"add cred {url}\n", f"add bad {wrong} chunk_size=64K\n"):
                e, reply = control_send(m.mnt, line)
                outputs.append((f"error reply (-d) of {line.split()[0:2]}", reply))
            outputs += outputs_of_mount(m, ["cred"])
        outputs.append(("daemon stderr (-d)", m.stderr()))
    check_no_secret(outputs, secrets)
    check_no_secret([(w, x) for w, x in outputs if w.startswith(("xattr", "control 'status",
                                                                    "streamfsctl status"))],
                    [query])


# ---------------------------------------------------------------------------
# 4. AWS SigV4
# ---------------------------------------------------------------------------

class RecordingRangeServer:
    """A threaded HTTP/1.1 server in this process serving ws().www with
    Range support (206 + Content-Range), recording each request's method,
    path and headers."""

    def __init__(self, root):
        self.root = root
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _serve(self, body):
                with outer.lock:
                    outer.requests.append((self.command, self.path, list(self.headers.items())))
                name = os.path.basename(self.path.split("?", 1)[0])
                path = os.path.join(outer.root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = st.st_size
                first, last, status = 0, size - 1, 200
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m:
                    first = int(m[1])
                    last = min(int(m[2]) if m[2] else size - 1, size - 1)
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{st.st_ino:x}-{st.st_mtime_ns:x}"')
                self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                if body:
                    with open(path, "rb") as f:
                        f.seek(first)
                        self.wfile.write(f.read(last - first + 1))

            def do_GET(self):
                self._serve(True)

            def do_HEAD(self):
                self._serve(False)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        h.defer(self.stop, "recording http server")

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self):
        if self.srv is not None:
            srv, self.srv = self.srv, None
            srv.shutdown()
            srv.server_close()

    def recorded(self):
        with self.lock:
            return list(self.requests)


def _hmac(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def check_sigv4(method, path, headers, port, region="us-east-1", service="s3"):
    """Recomputes the AWS Signature Version 4 of a request as S3 would and
    returns a list of problems (empty when the signature is valid)."""
    hd = {}
    for k, v in headers:
        hd.setdefault(k.lower(), []).append(v)
    auth = (hd.get("authorization") or [""])[0]
    m = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,"
                     r"\s*SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})", auth)
    if not m:
        return [f"Authorization is not AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/...: {auth!r}"]
    key_id, day, reg, svc, signed, sig = m.groups()
    problems = []
    if key_id != AWS_KEY_ID:
        problems.append(f"credential key id {key_id!r}")
    if (reg, svc) != (region, service):
        problems.append(f"scope {reg}/{svc}, expected {region}/{service}")
    amz_date = (hd.get("x-amz-date") or [""])[0]
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
        return problems + [f"x-amz-date missing or malformed: {amz_date!r}"]
    if amz_date[:8] != day:
        problems.append(f"x-amz-date {amz_date} is not of the credential's day {day}")
    when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    skew = abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds())
    if skew > 300:
        problems.append(f"x-amz-date {amz_date} is {skew:.0f} s off")
    names = signed.split(";")
    for must in ("host", "x-amz-date"):
        if must not in names:
            problems.append(f"{must} is not signed (SignedHeaders={signed})")
    canon_headers = ""
    for n in names:
        if n not in hd:
            problems.append(f"signed header {n} is not in the request")
            return problems
        canon_headers += n + ":" + ",".join(" ".join(v.split()) for v in hd[n]) + "\n"
    payload = (hd.get("x-amz-content-sha256") or [hashlib.sha256(b"").hexdigest()])[0]
    upath, _, query = path.partition("?")
    canon_query = "&".join(sorted(query.split("&"))) if query else ""
    creq = "\n".join([method, upath, canon_query, canon_headers, signed, payload])
    scope = f"{day}/{reg}/{svc}/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                     hashlib.sha256(creq.encode()).hexdigest()])
    k = _hmac(("AWS4" + AWS_SECRET).encode(), day)
    for part in (reg, svc, "aws4_request"):
        k = _hmac(k, part)
    want = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    if want != sig:
        problems.append(f"signature {sig} does not verify (expected {want}); "
                        f"canonical request {creq!r}")
    return problems


def aws_credentials_file(mode=0o600):
    d = ws().mkdir("aws", unique=True)
    return write_private(os.path.join(d, "credentials"),
                         "[other]\naws_access_key_id = AKIDOTHER\n"
                         "aws_secret_access_key = otherSECRET\n\n"
                         f"[default]\naws_access_key_id = {AWS_KEY_ID}\n"
                         f"aws_secret_access_key = {AWS_SECRET}\n", mode=mode)


def test_aws_sigv4():
    t = template()
    cred = aws_credentials_file()
    srv = RecordingRangeServer(ws().www)
    opts = ["stream=manual", "readahead=0", "aws_sigv4=aws:amz:us-east-1:s3", f"aws_credentials={cred}",
            "debug=all"]
    with h.Mount(ws(), image_dir(), opts=opts) as m:
        add_ok(m, "s3", srv.url(t.name))
        d = m.path("s3")
        if h.pread_all(d, 7 * CHUNK + 3, 2 * CHUNK) != t.read(7 * CHUNK + 3, 2 * CHUNK):
            fail("data read with SigV4 differ")
        control_ok(m.mnt, "chunk s3 0\n")
        reqs = srv.recorded()
        if len(reqs) < 3:
            fail(f"expected at least 3 requests (probe, read, chunk), got {len(reqs)}")
        problems = []
        for method, path, headers in reqs:
            for p in check_sigv4(method, path, headers, srv.port):
                problems.append(f"{method} {path}: {p}")
            if any(AWS_SECRET in v for _, v in headers):
                problems.append(f"{method} {path}: the secret is sent in a header")
        if problems:
            fail("SigV4 problems:\n  " + "\n  ".join(problems))
        auth = dict((k.lower(), v) for k, v in reqs[0][2])["authorization"]
        h.log(f"{len(reqs)} requests signed, e.g. {auth[:80]}...")
        outputs = outputs_of_mount(m, ["s3"])
    outputs.append(("daemon stderr (-f -o debug=all)", m.stderr()))
    check_no_secret(outputs, [AWS_SECRET])


def test_aws_credentials_must_be_private():
    img = image_dir()
    cred = aws_credentials_file(mode=0o644)
    for mode in (0o644, 0o660):
        os.chmod(cred, mode)
        expect_mount_refused(img, ["stream=manual", "readahead=0", "aws_sigv4=aws:amz:us-east-1:s3",
                                   f"aws_credentials={cred}"],
                             r"(?i)credential.*(group|other|world|mode|permission|readable|600)",
                             f"aws_credentials with mode {mode:04o}", secrets=[AWS_SECRET])
    os.chmod(cred, 0o600)
    expect_mount_refused(img, ["stream=manual", "readahead=0", "aws_sigv4=aws:amz:us-east-1:s3"],
                         r"(?i)aws_credentials",
                         "aws_sigv4 without aws_credentials", secrets=[AWS_SECRET])
    if h.listdir_set(img):
        fail(f"refused mounts left files in the image dir: {sorted(h.listdir_set(img))}")


def _require_nginx_ssl():
    nginx = h.find_program("nginx")
    if not nginx:
        return  # h.main reports the missing prerequisite
    p = h.run([nginx, "-V"])
    if "with-http_ssl_module" not in p.stdout_text + p.stderr_text:
        msg = "nginx lacks with-http_ssl_module"
        if h.IN_CI:
            print(f"FAIL: {msg} (CI=true: not skipping)", flush=True)
            sys.exit(1)
        print(f"SKIP: {msg}", flush=True)
        sys.exit(77)


if __name__ == "__main__":
    _require_nginx_ssl()
    h.main(globals(), extra_programs=("openssl", "cmp"))
