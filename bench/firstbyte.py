#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Time to the first 4 KiB of a range GET on one keep-alive connection,
without streamfs: how soon this machine lets a client see a server's
reply.  Not part of bench.py's suite; see BENCHMARKS.md (3).

usage: firstbyte.py URL SIZE_MIB GAP_S [N]

Makes N (default 40) GETs of SIZE_MIB MiB at different offsets of URL,
sleeping GAP_S seconds before each, and prints the median time from the
request going out to the first 4 KiB of body and to the whole body.
"""
import socket
import statistics
import sys
import time
import urllib.parse


def recv_reply(s, size):
    """Reads one reply of size body bytes; returns (t_first_4k, t_end)."""
    head, body, first = b"", 0, None
    while True:
        # Small reads until the first 4 KiB: a big one would time a copy.
        d = s.recv(1 << 20 if first else 4096)
        if not d:
            raise SystemExit("the server closed the connection")
        if head is not None:
            head += d
            if b"\r\n\r\n" not in head:
                continue
            status = head.split(b"\r\n", 1)[0]
            if b" 206 " not in status:
                raise SystemExit("reply %r, expected 206" % status.decode(errors="replace"))
            body = len(head.split(b"\r\n\r\n", 1)[1])
            head = None
        else:
            body += len(d)
        if first is None and body >= 4096:
            first = time.perf_counter()
        if body >= size:
            return first, time.perf_counter()


def main():
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__.strip().split("\n\n")[1])
    url = urllib.parse.urlsplit(sys.argv[1])
    size = int(sys.argv[2]) << 20
    gap = float(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) == 5 else 40
    s = socket.create_connection((url.hostname, url.port or 80))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first, total = [], []
    for i in range(n + 1):
        off = ((i * 7 + 3) % 64) * size
        req = "GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=%d-%d\r\n\r\n" % (
            url.path or "/", url.netloc, off, off + size - 1)
        time.sleep(gap)
        t0 = time.perf_counter()
        s.sendall(req.encode())
        t1, t2 = recv_reply(s, size)
        if i:  # the first request may pay for the connection
            first.append(t1 - t0)
            total.append(t2 - t0)
    print("%d MiB, %.3f s apart: first 4 KiB p50 %.3f ms, whole body p50 %.3f ms"
          % (size >> 20, gap, statistics.median(first) * 1e3, statistics.median(total) * 1e3))


if __name__ == "__main__":
    main()
