#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Self-test of tests/faultserver.py: normal range behaviour, preconditions,
each fault, the request log and clean exit on SIGTERM.

Stdlib only, plain asserts; exits 0 on success.  Starts the server on a temp
directory holding a generated file and always terminates it and removes the
directory, even when an assertion fails.
"""

import email.utils
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "faultserver.py")
SIZE = 1024 * 1024 + 123
PATH = "/img/disk.raw"


class Harness:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="faultserver-test-")
        root = os.path.join(self.tmp, "root")
        os.makedirs(os.path.join(root, "img"))
        self.data = random.Random(42).randbytes(SIZE)
        with open(os.path.join(root, PATH.lstrip("/")), "wb") as f:
            f.write(self.data)
        self.log = os.path.join(self.tmp, "requests.log")
        port_file = os.path.join(self.tmp, "port")
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--root", root, "--port-file", port_file,
             "--log", self.log])
        deadline = time.monotonic() + 5
        while not os.path.exists(port_file):
            assert self.proc.poll() is None, "server exited early"
            assert time.monotonic() < deadline, "no port file after 5 s"
            time.sleep(0.02)
        with open(port_file) as f:
            self.port = int(f.read())
        self.requests = 0  # file requests sent: each logs one record

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def conn(self, timeout=5):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method="GET", path=PATH, headers=None, conn=None):
        """Return (response, body) on a fresh connection unless one is given."""
        c = conn or self.conn()
        self.requests += 1
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        if conn is None:
            c.close()
        return r, body

    def faults(self, rules):
        c = self.conn()
        c.request("POST", "/_fault", body=json.dumps(rules),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        body = r.read()
        c.close()
        assert r.status == 200, (r.status, body)
        return json.loads(body)

    def log_lines(self, n):
        """The last n log records, polling briefly: a line is written just
        after the response is sent, so it may trail the client's read.
        Waits for the record of every request sent so far."""
        deadline = time.monotonic() + 2
        while True:
            with open(self.log) as f:
                lines = [json.loads(x) for x in f]
            if len(lines) >= self.requests or time.monotonic() > deadline:
                return lines[-n:]
            time.sleep(0.02)


def expect_error(h, rule, exc_types, headers=None):
    h.faults([rule])
    try:
        h.request(headers=headers)
    except exc_types:
        return
    finally:
        h.faults([])
    raise AssertionError("no error for %r" % (rule,))


def run(h):
    d = h.data
    # Whole file, validators, keep-alive across several requests.
    c = h.conn()
    r, body = h.request(conn=c)
    assert r.status == 200 and body == d
    assert r.getheader("Content-Length") == str(SIZE)
    assert r.getheader("Accept-Ranges") == "bytes"
    etag, lm = r.getheader("ETag"), r.getheader("Last-Modified")
    assert etag.startswith('"') and etag.endswith('"'), etag
    assert email.utils.parsedate_to_datetime(lm)
    for rng, (a, b) in [("bytes=10-19", (10, 19)), ("bytes=%d-" % (SIZE - 5), (SIZE - 5, SIZE - 1)),
                        ("bytes=-100", (SIZE - 100, SIZE - 1)), ("bytes=0-", (0, SIZE - 1)),
                        ("bytes=5-99999999", (5, SIZE - 1)), ("bytes=-99999999", (0, SIZE - 1))]:
        r, body = h.request(headers={"Range": rng}, conn=c)
        assert r.status == 206, (rng, r.status)
        assert r.getheader("Content-Range") == "bytes %d-%d/%d" % (a, b, SIZE), r.getheader("Content-Range")
        assert body == d[a:b + 1] and r.getheader("Content-Length") == str(b - a + 1)
    recs = h.log_lines(7)
    assert len({x["client_port"] for x in recs}) == 1, "keep-alive not kept"
    assert recs[1] == {**recs[1], "method": "GET", "path": PATH, "range": "bytes=10-19",
                       "status": 206, "bytes": 10, "fault": None}, recs[1]
    c.close()

    # Invalid or multiple ranges are ignored; HEAD ignores Range.
    for rng in ["bytes=5-4", "items=0-1", "bytes=0-1,5-6"]:
        r, body = h.request(headers={"Range": rng})
        assert r.status == 200 and len(body) == SIZE, rng
    r, body = h.request("HEAD", headers={"Range": "bytes=0-9"})
    assert r.status == 200 and body == b"" and r.getheader("Content-Length") == str(SIZE)

    # 416 and 404.
    for rng in ["bytes=%d-" % SIZE, "bytes=-0"]:
        r, _ = h.request(headers={"Range": rng})
        assert r.status == 416 and r.getheader("Content-Range") == "bytes */%d" % SIZE, rng
    assert h.request(path="/nope")[0].status == 404
    assert h.request(path="/../../etc/passwd")[0].status == 404

    # Preconditions.
    rng = {"Range": "bytes=0-9"}
    assert h.request(headers={**rng, "If-Match": etag})[0].status == 206
    assert h.request(headers={**rng, "If-Match": '"other", ' + etag})[0].status == 206
    assert h.request(headers={**rng, "If-Match": "W/" + etag})[0].status == 412
    assert h.request(headers={**rng, "If-Match": '"nope"'})[0].status == 412
    assert h.request(headers={**rng, "If-Match": "*"})[0].status == 206
    past = email.utils.formatdate(time.time() - 86400 * 365, usegmt=True)
    assert h.request(headers={**rng, "If-Unmodified-Since": past})[0].status == 412
    assert h.request(headers={**rng, "If-Unmodified-Since": lm})[0].status == 206
    assert h.request(headers={**rng, "If-Range": etag})[0].status == 206
    assert h.request(headers={**rng, "If-Range": '"old"'})[0].status == 200

    # Control endpoint round trip and validation.
    rules = h.faults([{"fault": "status", "status": 500, "count": 2, "path": "/x"}])
    c = h.conn()
    c.request("GET", "/_fault")
    assert json.loads(c.getresponse().read()) == rules and rules[0]["count"] == 2
    c.request("POST", "/_fault", body='[{"fault": "nosuch"}]')
    r = c.getresponse()
    assert r.status == 400, r.status
    r.read()
    c.close()

    # refuse: no response at all; count limits it to one request.
    h.faults([{"fault": "refuse", "count": 1}])
    try:
        h.request()
        raise AssertionError("refuse gave a response")
    except (http.client.RemoteDisconnected, ConnectionError):
        pass
    assert h.request()[0].status == 200, "count 1 applied twice"
    assert h.log_lines(2)[0]["status"] is None

    # Truncations.
    expect_error(h, {"fault": "reset_mid_body", "after_bytes": 1000},
                 (ConnectionResetError, http.client.IncompleteRead))
    assert h.log_lines(1)[0]["bytes"] == 1000
    expect_error(h, {"fault": "short_body", "after_bytes": 100}, http.client.IncompleteRead)
    rec = h.log_lines(1)[0]
    assert rec["fault"] == "short_body" and rec["bytes"] == 100 and rec["status"] == 200
    t0 = time.monotonic()
    expect_error(h, {"fault": "stall", "after_bytes": 10, "seconds": 0.5}, http.client.IncompleteRead)
    assert time.monotonic() - t0 >= 0.45

    # slow: 20000 bytes at 40000 B/s take about half a second.
    h.faults([{"fault": "slow", "rate": 40000}])
    t0 = time.monotonic()
    r, body = h.request(headers={"Range": "bytes=0-19999"})
    assert r.status == 206 and body == d[:20000] and time.monotonic() - t0 >= 0.4

    # status with Retry-After; path matching.
    h.faults([{"fault": "status", "status": 503, "retry_after": 7, "path": PATH}])
    r, _ = h.request()
    assert r.status == 503 and r.getheader("Retry-After") == "7"
    h.faults([{"fault": "status", "status": 429, "path": "/other"}])
    assert h.request()[0].status == 200

    # Range lies.
    h.faults([{"fault": "ignore_range"}])
    r, body = h.request(headers=rng)
    assert r.status == 200 and body == d
    h.faults([{"fault": "wrong_range"}])
    r, body = h.request(headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.getheader("Content-Range") == "bytes 11-20/%d" % SIZE
    assert body == d[11:21]
    h.faults([{"fault": "wrong_total"}])
    r, body = h.request(headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.getheader("Content-Range") == "bytes 10-19/%d" % (SIZE + 1)
    assert body == d[10:20]

    # change_etag: new validators, old If-Match fails.
    h.faults([{"fault": "change_etag"}])
    r, _ = h.request(headers=rng)
    assert r.status == 206 and r.getheader("ETag") != etag and r.getheader("Last-Modified") != lm
    assert h.request(headers={**rng, "If-Match": etag})[0].status == 412
    assert h.request(headers={**rng, "If-Unmodified-Since": lm})[0].status == 412
    h.faults([])
    assert h.request(headers={**rng, "If-Match": etag})[0].status == 206

    # delay.
    h.faults([{"fault": "delay", "seconds": 0.3, "method": "GET"}])
    t0 = time.monotonic()
    assert h.request(headers=rng)[0].status == 206 and time.monotonic() - t0 >= 0.28

    # SIGTERM while a connection stalls: exits promptly and cleanly.
    h.faults([{"fault": "stall"}])
    s = socket.create_connection(("127.0.0.1", h.port))
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % PATH).encode())
    s.settimeout(2)
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    h.proc.send_signal(signal.SIGTERM)
    assert h.proc.wait(5) == 0
    s.close()


def main():
    started = time.monotonic()
    h = Harness()
    try:
        run(h)
    finally:
        h.close()
    print("faultserver self-test passed in %.1f s" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
