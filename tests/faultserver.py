#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Fault-injecting HTTP/1.1 file server for streamfs integration tests.

Written from RFC 9110 (range requests, conditional requests), not from the
streamfs client, so that the client is tested against an independent reading
of the spec.  Standard library only.

CLI:
    python3 tests/faultserver.py --root DIR --port-file FILE
                                 [--host 127.0.0.1] [--log FILE]

The server binds an ephemeral port on --host, then writes the port number
(one line) to --port-file via a temp file and rename, so a reader sees either
nothing or the whole number.  Files under DIR are served at their path with
GET and HEAD.  SIGTERM or SIGINT makes it exit with status 0; stalled and slow
responses are woken and closed.

Normal behaviour: one "bytes" range per request ("a-b", "a-", "-n") gives
206 with "Content-Range: bytes a-b/size"; an unsatisfiable range gives 416
with "Content-Range: bytes */size"; no Range (or an invalid or multi-range
one, which RFC 9110 lets a server ignore) gives 200.  HEAD ignores Range, as
RFC 9110 14.2 requires for methods without defined range handling.  Every
response carries Content-Length; keep-alive is on.  Files get a strong ETag
built from (size, mtime_ns), Last-Modified, and Accept-Ranges: bytes.
If-Match (strong comparison) and If-Unmodified-Since (only when If-Match is
absent) give 412 when they fail; If-Range is honoured (a mismatch gives 200).

Log (--log): one JSON object per request, flushed per line:
    {"method", "path" (raw request target), "range" (Range header or null),
     "status" (null if no response was sent), "bytes" (body bytes written to
     the socket), "fault" (rule name or null), "if_match", "if_unmodified_since",
     "if_range" (raw headers or null), "client_port", "time" (epoch seconds)}
A line is written after the last body byte is sent (before the sleep of a
"stall" and before the close of "refuse"/"reset_mid_body"/"short_body"), so
a test may need to poll briefly for it.  /_fault requests are not logged.

Faults, set at run time through the control endpoint:
    POST /_fault   JSON list of rules (or one rule object); replaces all rules.
                   "[]" clears.  Answers 200 with the stored rules, or 400.
    GET  /_fault   the current rules, with their remaining counts.
A rule is an object:
    "fault"        required, one of FAULTS below
    "count"        matching requests it applies to; omitted or -1 = forever
    "path"         only requests whose decoded URL path equals this
    "method"       only this method ("GET" or "HEAD")
    "after_bytes"  reset_mid_body, short_body, stall: body bytes sent first (0)
    "seconds"      stall (3600), delay (1)
    "rate"         slow: body bytes per second (65536)
    "status"       status: the code to send (503)
    "retry_after"  status: value of a Retry-After header (none if omitted)
    "shift"        wrong_range: bytes added to both ends of the range (1)
    "total"        wrong_total: the total to claim (real size + 1)
Rules are tried in order; the first one that matches and is not used up
applies to the request and its count is decremented.  Each request gets at
most one fault.  A rule is consumed even where it has nothing to act on (a
body fault on HEAD, wrong_range without a Range header): use "method".
    refuse          drop the connection with a TCP RST, no response
    reset_mid_body  headers + after_bytes of body, then RST (SO_LINGER 0)
    short_body      headers with the full Content-Length, after_bytes of
                    body, then a clean close (FIN)
    stall           headers + after_bytes of body, sleep, then close
    slow            whole response, body paced at "rate" bytes/s
    status          "status" with a small text body (+ Retry-After)
    ignore_range    200 with the whole file even if a Range was asked
    wrong_range     206 whose Content-Range and bytes are shifted by "shift"
                    (clamped to the file), body length matching the header
    wrong_total     206 with the right bytes but Content-Range total "total"
    change_etag     the file looks changed: different ETag, Last-Modified one
                    hour later; If-Match/If-Unmodified-Since are checked
                    against the new validators (so old ones get 412)
    replaced        the file looks changed as with change_etag, and the
                    answer is 200 with the whole file whatever the request's
                    Range, If-Match or If-Unmodified-Since (a cache in front
                    of a replaced template that ignores conditions)
    delay           wait "seconds", then answer normally
"""

import argparse
import email.utils
import fcntl
import json
import os
import posixpath
import re
import signal
import socket
import stat
import struct
import sys
import termios
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTROL_PATH = "/_fault"
CHUNK = 64 * 1024
CHANGE_NS = 3600 * 10**9  # change_etag moves mtime one hour forward
FAULTS = {"refuse", "reset_mid_body", "short_body", "stall", "slow", "status",
          "ignore_range", "wrong_range", "wrong_total", "change_etag", "replaced", "delay"}
INT_FIELDS = {"count", "after_bytes", "status", "shift", "total"}
NUM_FIELDS = {"seconds", "rate"}
STR_FIELDS = {"fault", "path", "method"}
RULE_FIELDS = INT_FIELDS | NUM_FIELDS | STR_FIELDS | {"retry_after"}

UNSATISFIABLE = "unsatisfiable"
# One range-spec; the unit is case-insensitive (RFC 9110 14.1).
RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
ETAG_RE = re.compile(r'\*|(?:W/)?"[^"]*"')


def parse_range(value, size):
    """Return None when Range must be ignored (absent, invalid, several
    ranges), UNSATISFIABLE, or the inclusive (first, last) pair clamped to a
    file of `size` bytes (RFC 9110 14.1.2)."""
    if value is None:
        return None
    m = RANGE_RE.match(value)
    if not m:
        return None
    first, last = m.groups()
    if first == "":
        if last == "":
            return None
        n = int(last)  # suffix-range: the last n bytes
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return (max(0, size - n), size - 1)
    a = int(first)
    if last != "" and int(last) < a:
        return None  # invalid range-spec: ignored, not 416
    if a >= size:
        return UNSATISFIABLE
    return (a, size - 1 if last == "" else min(int(last), size - 1))


def parse_http_date(value):
    """Epoch seconds of an HTTP-date, or None if it does not parse."""
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def normalise_rules(doc):
    """Validate the JSON of POST /_fault; return a list of rule dicts."""
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise ValueError("expected a list of rule objects")
    rules = []
    for rule in doc:
        if not isinstance(rule, dict):
            raise ValueError("rule is not an object: %r" % (rule,))
        unknown = set(rule) - RULE_FIELDS
        if unknown:
            raise ValueError("unknown rule field(s): %s" % ", ".join(sorted(unknown)))
        if rule.get("fault") not in FAULTS:
            raise ValueError("unknown fault: %r" % (rule.get("fault"),))
        for key, val in rule.items():
            ok = (isinstance(val, int) if key in INT_FIELDS else
                  isinstance(val, (int, float)) if key in NUM_FIELDS else
                  isinstance(val, str) if key in STR_FIELDS else
                  isinstance(val, (int, str)))
            if not ok or isinstance(val, bool):
                raise ValueError("bad value for %s: %r" % (key, val))
        rule = dict(rule)
        rule.setdefault("count", -1)
        if "method" in rule:
            rule["method"] = rule["method"].upper()
        rules.append(rule)
    return rules


class FaultServer(ThreadingHTTPServer):
    """Holds the served root, the fault rules and the request log."""
    daemon_threads = True  # a stalled handler must not block exit

    def __init__(self, host, root, log_path):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), Handler)
        self.root = os.path.realpath(root)
        self.stopping = threading.Event()  # set on shutdown; wakes all sleeps
        self.rules_lock = threading.Lock()  # protects self.rules
        self.rules = []
        self.log_lock = threading.Lock()  # protects self.log_file
        self.log_file = open(log_path, "a", encoding="utf-8") if log_path else None

    def set_rules(self, rules):
        with self.rules_lock:
            self.rules = rules

    def get_rules(self):
        with self.rules_lock:
            return [dict(r) for r in self.rules]

    def take_rule(self, method, path):
        """Return a copy of the first live rule matching the request and
        consume one use of it; None if no rule applies."""
        with self.rules_lock:
            for rule in self.rules:
                if rule["count"] == 0:
                    continue
                if rule.get("path", path) != path or rule.get("method", method) != method:
                    continue
                if rule["count"] > 0:
                    rule["count"] -= 1
                return dict(rule)
        return None

    def log(self, record):
        if self.log_file is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; we always send Content-Length
    server_version = "faultserver/1"
    rec = None  # log record of the file request in progress; None for /_fault

    def log_message(self, fmt, *args):
        pass  # the JSON log replaces http.server's stderr access log

    # -- dispatch ---------------------------------------------------------

    def do_GET(self):
        self.rec = None
        if self.url_path() == CONTROL_PATH:
            self.send_small(200, json.dumps(self.server.get_rules()) + "\n",
                            {"Content-Type": "application/json"})
        else:
            self.serve(head=False)

    def do_HEAD(self):
        self.serve(head=True)

    def do_POST(self):
        self.rec = None
        if self.url_path() != CONTROL_PATH:
            self.send_small(405, "method not allowed\n", {"Allow": "GET, HEAD"})
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            rules = normalise_rules(json.loads(raw.decode("utf-8") or "[]"))
        except ValueError as e:  # includes JSON and UTF-8 decode errors
            self.send_small(400, "bad fault rules: %s\n" % e)
            return
        self.server.set_rules(rules)
        self.send_small(200, json.dumps(rules) + "\n",
                        {"Content-Type": "application/json"})

    def url_path(self):
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def serve(self, head):
        """Answer one GET/HEAD of a file, applying at most one fault."""
        path = self.url_path()
        rule = self.server.take_rule(self.command, path) or {}
        self.logged = False
        self.reset = False  # end the connection with RST once logged
        self.rec = {
            "method": self.command, "path": self.path, "fault": rule.get("fault"),
            "range": self.headers.get("Range"), "status": None, "bytes": 0,
            "if_match": self.headers.get("If-Match"),
            "if_unmodified_since": self.headers.get("If-Unmodified-Since"),
            "if_range": self.headers.get("If-Range"),
            "client_port": self.client_address[1], "time": round(time.time(), 3),
        }
        try:
            self.respond(head, path, rule)
        except OSError:  # the client went away mid-response
            self.close_connection = True
        self.write_log()
        if self.reset:
            self.reset_connection()

    # -- normal responses ---------------------------------------------------

    def respond(self, head, path, rule):
        fault = rule.get("fault")
        if fault == "refuse":
            self.reset = True
            return
        if fault == "delay":
            self.server.stopping.wait(rule.get("seconds", 1))
        if fault == "status":
            code = rule.get("status", 503)
            extra = {}
            if "retry_after" in rule:
                extra["Retry-After"] = str(rule["retry_after"])
            self.send_small(code, "injected status %d\n" % code, extra, head)
            return
        f = self.open_file(path)
        if f is None:
            self.send_small(404, "not found\n", {}, head)
            return
        with f:
            st = os.fstat(f.fileno())
            size, mtime_ns = st.st_size, st.st_mtime_ns
            if fault in ("change_etag", "replaced"):
                mtime_ns += CHANGE_NS
            etag = '"%x-%x"' % (size, mtime_ns)
            mtime = mtime_ns // 10**9
            hdrs = {"ETag": etag, "Accept-Ranges": "bytes",
                    "Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
            if fault != "replaced" and not self.preconditions_hold(etag, mtime):
                self.send_small(412, "precondition failed\n", hdrs, head)
                return
            rng = None
            if (not head and fault not in ("ignore_range", "replaced")
                    and self.if_range_holds(etag, mtime)):
                rng = parse_range(self.headers.get("Range"), size)
            if rng == UNSATISFIABLE:
                hdrs["Content-Range"] = "bytes */%d" % size
                self.send_small(416, "range not satisfiable\n", hdrs, head)
                return
            status, start, length = 200, 0, size
            if rng is not None:
                a, b = rng
                if fault == "wrong_range":
                    shift = rule.get("shift", 1)
                    a = min(max(a + shift, 0), size - 1)
                    b = min(max(b + shift, a), size - 1)
                total = rule.get("total", size + 1) if fault == "wrong_total" else size
                hdrs["Content-Range"] = "bytes %d-%d/%d" % (a, b, total)
                status, start, length = 206, a, b - a + 1
            hdrs["Content-Length"] = str(length)
            self.send_head(status, hdrs)
            if not head:
                self.send_body(f, start, length, rule)

    def open_file(self, path):
        """Open the regular file at URL path `path` under the root, refusing
        anything that resolves outside it; None if there is no such file."""
        root = self.server.root
        full = os.path.realpath(os.path.join(root, posixpath.normpath(path).lstrip("/")))
        if full != root and not full.startswith(root + os.sep):
            return None
        try:
            f = open(full, "rb")
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            return None
        return f

    def preconditions_hold(self, etag, mtime):
        """RFC 9110 13.2.2 steps 1-2: If-Match, else If-Unmodified-Since."""
        if_match = self.headers.get("If-Match")
        if if_match is not None:
            # Strong comparison: a weak tag never matches, "*" always does.
            tags = ETAG_RE.findall(if_match)
            return "*" in tags or etag in tags
        ius = self.headers.get("If-Unmodified-Since")
        if ius is not None:
            when = parse_http_date(ius)
            if when is not None and mtime > when:
                return False
        return True

    def if_range_holds(self, etag, mtime):
        """RFC 9110 13.1.5: true unless If-Range names another version."""
        value = self.headers.get("If-Range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith('"') or value.startswith("W/"):
            return value == etag
        return parse_http_date(value) == mtime

    def send_head(self, status, headers):
        if self.rec is not None:
            self.rec["status"] = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def send_small(self, status, text, headers=None, head=False):
        """Send a complete response with a short text body."""
        body = text.encode()
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        headers["Content-Length"] = str(len(body))
        self.send_head(status, headers)
        if not head:
            self.wfile.write(body)
            if self.rec is not None:
                self.rec["bytes"] = len(body)

    # -- body faults --------------------------------------------------------

    def send_body(self, f, start, length, rule):
        """Send `length` bytes of `f` from `start`, as the rule's fault says."""
        fault = rule.get("fault")
        limit = length
        if fault in ("reset_mid_body", "short_body", "stall"):
            limit = min(length, max(0, rule.get("after_bytes", 0)))
        rate = rule.get("rate", 65536) if fault == "slow" else None
        chunk = CHUNK if rate is None else max(1, int(rate / 20))  # ~20 sends/s
        began = time.monotonic()
        f.seek(start)
        while self.rec["bytes"] < limit:
            data = f.read(min(chunk, limit - self.rec["bytes"]))
            if not data:  # the file shrank under us: framing is now wrong
                self.close_connection = True
                break
            self.wfile.write(data)
            self.rec["bytes"] += len(data)
            if rate is not None:
                due = began + self.rec["bytes"] / rate
                if self.server.stopping.wait(max(0.0, due - time.monotonic())):
                    self.close_connection = True
                    return
        if fault == "reset_mid_body":
            self.reset = True
        elif fault == "short_body":
            self.close_connection = True
        elif fault == "stall":
            self.write_log()  # log now: the stall may outlast the test
            self.server.stopping.wait(rule.get("seconds", 3600))
            self.close_connection = True

    def write_log(self):
        if not self.logged:
            self.logged = True
            self.server.log(self.rec)

    def reset_connection(self):
        """Abort the connection with a TCP RST instead of a FIN."""
        self.close_connection = True
        sock = self.connection
        # close() with SO_LINGER 0 discards unsent data, so first let the
        # kernel send what the log says was sent (bounded wait).
        deadline = time.monotonic() + 2
        buf = bytearray(4)
        while time.monotonic() < deadline:
            try:
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # SIOCOUTQ
            except OSError:
                break
            if struct.unpack("i", buf)[0] == 0 or self.server.stopping.wait(0.01):
                break
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # rfile holds a reference to the socket: drop it so close() really
        # closes the descriptor now, before socketserver's shutdown(SHUT_WR)
        # could send a FIN.
        self.rfile.close()
        sock.close()


def write_port_file(path, port):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w", encoding="ascii") as f:
        f.write("%d\n" % port)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="fault-injecting HTTP/1.1 file server")
    ap.add_argument("--root", required=True, help="directory to serve")
    ap.add_argument("--port-file", required=True, help="where to write the port")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind")
    ap.add_argument("--log", help="append one JSON line per request here")
    args = ap.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server = FaultServer(args.host, args.root, args.log)
    # serve_forever runs in a thread: shutdown() blocks until it returns, so
    # it cannot be called from a signal handler in the serving thread.
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    write_port_file(args.port_file, server.server_address[1])
    while not stop.wait(0.5):
        pass
    server.stopping.set()
    server.shutdown()
    server.server_close()
    if server.log_file is not None:
        server.log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
