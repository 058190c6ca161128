# SPDX-License-Identifier: MIT
"""Integrity manifests through a real mount: zero chunks are present from
the start as holes, never fetched, and reported by SEEK_HOLE/SEEK_DATA;
every fetched chunk is checked, a mismatch is fetched once more and then
puts the disk in state error; bad manifests are refused at add; verify
finds corrupted local data and leaves out the chunks written through the
mount.

Run: python3 tests/integration/test_manifest.py [test_name...]
"""

import errno
import os
import signal
import subprocess

import harness as h
from harness import KiB, MiB, fail

CHUNK = 256 * KiB


ws = h.workspace
xattr = h.xattr
control = h.control_send


def sparse_template(name, layout):
    """A template of len(layout) chunks: 'z' chunks are zeros, 'd' random."""
    path = os.path.join(ws().www, name)
    with open(path, "wb") as f:
        for k, c in enumerate(layout):
            f.write(bytes(CHUNK) if c == "z" else os.urandom(CHUNK))
        f.write(os.urandom(1000))  # a short last chunk of data
    os.chmod(path, 0o644)
    return path


def make_manifest(path, chunk="256K"):
    out = path + ".manifest"
    p = subprocess.run([h.STREAMFSCTL, "manifest", path, "--chunk-size", chunk],
                       capture_output=True, timeout=60)
    if p.returncode != 0:
        fail(f"streamfsctl manifest failed: {p.stderr.decode()}")
    with open(out, "wb") as f:
        f.write(p.stdout)
    os.chmod(out, 0o644)
    return out


def add_with_manifest(img, name, ng, tname):
    """streamfsctl add NAME with the template and its manifest from ng."""
    rc, out, err = h.ctl("add", img, name, ng.url(tname), "--manifest",
                         ng.url(tname + ".manifest"))
    if rc != 0:
        fail(f"add --manifest failed: {err}")


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


def test_zero_chunks_are_holes_and_never_fetched():
    layout = "zzdzddzzzd" + "z" * 6
    tpath = sparse_template("holes.img", layout)
    man = make_manifest(tpath)
    with open(man) as f:
        lines = f.read().splitlines()
    if lines[0] != "streamfs-manifest 1" or lines[3:].count("zero") != layout.count("z"):
        fail(f"manifest does not mark the {layout.count('z')} zero chunks: {lines[:6]}")
    with h.Nginx(ws()) as ng:
        img = ws().mkdir("images", unique=True)
        add_with_manifest(img, "hz", ng, "holes.img")
        ng.mark()
        with h.Mount(ws(), img, opts=("stream=manual", "readahead=0")) as m:
            disk = m.path("hz")
            zero_bytes = layout.count("z") * CHUNK
            if int(xattr(disk, "cached")) != zero_bytes:
                fail(f"cached {xattr(disk, 'cached')} at start, expected the {zero_bytes} "
                     "bytes of zero chunks")
            fd = os.open(disk, os.O_RDONLY)
            try:
                data = os.lseek(fd, 0, os.SEEK_DATA)
                hole = os.lseek(fd, 0, os.SEEK_HOLE)
                hole_after_data = os.lseek(fd, 2 * CHUNK, os.SEEK_HOLE)
            finally:
                os.close(fd)
            h.log(f"SEEK_DATA(0)={data} SEEK_HOLE(0)={hole} SEEK_HOLE(2 chunks)={hole_after_data}")
            if (data, hole) != (2 * CHUNK, 0) or hole_after_data != 3 * CHUNK:
                fail(f"SEEK_DATA/SEEK_HOLE {data}/{hole}/{hole_after_data}, expected "
                     f"{2 * CHUNK}/0/{3 * CHUNK}")
            got = read_all(disk)
            if got != read_all(tpath):
                fail("disk with manifest differs from the template")
            rs = h.ranges_of(ng.records(uri="/holes.img"))
            fetched = {a // CHUNK for a, b in rs for a in range(a, b + 1, CHUNK)}
            zeros = {k for k, c in enumerate(layout) if c == "z"}
            if fetched & zeros:
                fail(f"zero chunks {sorted(fetched & zeros)} were fetched: {rs}")
            err, reply = control(m.mnt, "verify hz\n")
            if err or not reply.startswith("ok"):
                fail(f"verify of a correct disk: {err} {reply!r}")
        # Corrupt one data chunk of the local image: verify finds it.
        with open(os.path.join(img, "hz.img"), "r+b") as f:
            f.seek(3 * CHUNK + 17)
            f.write(b"\xff")
        with h.Mount(ws(), img, opts=("stream=manual",), allow=[r"differ from the manifest"]) as m:
            rc, out, err = h.ctl("verify", m.path("hz"))
            if rc == 0 or str(3 * CHUNK) not in err:
                fail(f"verify of a corrupted disk: rc {rc} out {out!r} err {err!r}")
            h.log(f"verify found: {err.strip()}")


def test_mismatch_is_refetched_once_then_error():
    tpath = sparse_template("bad.img", "dddd")
    man = make_manifest(tpath)
    # Change chunk 2 but keep size and mtime, so nginx's ETag stays: only
    # the manifest can tell.
    st = os.stat(tpath)
    with open(tpath, "r+b") as f:
        f.seek(2 * CHUNK + 5)
        f.write(b"changed")
    os.utime(tpath, ns=(st.st_atime_ns, st.st_mtime_ns))
    with h.Nginx(ws()) as ng:
        img = ws().mkdir("images", unique=True)
        rc, out, err = h.ctl("add", img, "b", ng.url("bad.img"), "--manifest", man)
        if rc != 0:
            fail(f"add --manifest (a path) failed: {err}")
        ng.mark()
        with h.Mount(ws(), img, opts=("stream=manual", "readahead=0"),
                     allow=[r"does not match the manifest"]) as m:
            disk = m.path("b")
            ok = h.pread_all(disk, 0, 4096, os.O_DIRECT)
            if ok != read_all(tpath)[:4096]:
                fail("a matching chunk read wrong bytes")
            try:
                h.pread_all(disk, 2 * CHUNK, 4096, os.O_DIRECT)
                fail("a chunk that does not match the manifest was served")
            except OSError as e:
                if e.errno != errno.EIO:
                    fail(f"mismatching chunk: {e}, expected EIO")
            if xattr(disk, "state") != "error" or "manifest" not in xattr(disk, "error"):
                fail(f"state {xattr(disk, 'state')!r} error {xattr(disk, 'error')!r}")
            gets = [r for r in ng.records(uri="/bad.img") if r.byte_range() == (2 * CHUNK, 3 * CHUNK - 1)]
            if len(gets) != 2:
                fail(f"the mismatching chunk was fetched {len(gets)} times, expected 2 (one retry)")
        # Nothing of it was stored.
        with open(os.path.join(img, "b.img"), "rb") as f:
            f.seek(2 * CHUNK)
            if f.read(CHUNK) != bytes(CHUNK):
                fail("bytes of a mismatching chunk reached the local image")


META_FLAG_WRITTEN = 0x8


def meta_header(buf):
    """(flags, size, chunk size) of NAME.meta's newest valid header slot
    (format in cache/cache_i.h)."""
    best = None
    for o in (0, h.META_SLOT):
        s = buf[o:o + h.META_SLOT]
        hlen = int.from_bytes(s[12:16], "little")
        if s[:8] != h.META_MAGIC or not 64 <= hlen <= h.META_SLOT:
            continue
        if h.crc32c(s[:56] + bytes(4) + s[60:hlen]) != int.from_bytes(s[56:60], "little"):
            continue
        gen = int.from_bytes(s[16:24], "little")
        if best is None or gen > best[0]:
            best = (gen, int.from_bytes(s[36:40], "little"), int.from_bytes(s[24:32], "little"),
                    int.from_bytes(s[32:36], "little"))
    if best is None:
        fail("NAME.meta has no valid header slot: format changed, update the test")
    return best[1:]


def forget_written(path):
    """Makes NAME.meta what a streamfs without the written-bitmap left: the
    flag cleared in every valid header slot, the file cut after the
    present-bitmap."""
    with open(path, "r+b") as f:
        buf = bytearray(f.read())
        _, size, chunk = meta_header(buf)
        for o in (0, h.META_SLOT):
            hlen = int.from_bytes(buf[o + 12:o + 16], "little")
            if buf[o:o + 8] != h.META_MAGIC or not 64 <= hlen <= h.META_SLOT:
                continue
            flags = int.from_bytes(buf[o + 36:o + 40], "little") & ~META_FLAG_WRITTEN
            buf[o + 36:o + 40] = flags.to_bytes(4, "little")
            buf[o + 56:o + 60] = bytes(4)
            buf[o + 56:o + 60] = h.crc32c(buf[o:o + hlen]).to_bytes(4, "little")
        f.seek(0)
        f.write(buf[:h.META_BITMAP_OFFSET + (-(-size // chunk) + 7) // 8])
        f.truncate()


def expect_verify(m, name, want, what):
    err, reply = control(m.mnt, f"verify {name}\n")
    if reply != want:
        fail(f"verify {what}: errno {err}, reply {reply!r}; expected {want!r}")


def test_verify_leaves_out_written_chunks():
    """Chunks changed through the mount (written or zeroed) differ from the
    template by design: verify does not compare them, says how many, and
    the record of them survives a kill -9 after fsync.  A disk from a
    streamfs without that record gets one at mount, empty."""
    tpath = sparse_template("wr.img", "dddzdddd")  # and a short 9th chunk
    make_manifest(tpath)
    with h.Nginx(ws()) as ng:
        img = ws().mkdir("images", unique=True)
        add_with_manifest(img, "wr", ng, "wr.img")
        meta = os.path.join(img, "wr.meta")
        flags, _, _ = meta_header(open(meta, "rb").read())
        if not flags & META_FLAG_WRITTEN:
            fail(f"a new disk's metadata lacks the written-bitmap: flags {flags:#x}")
        m = h.Mount(ws(), img).start()
        disk = m.path("wr")
        fd = os.open(disk, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 100, CHUNK + 5)              # into an absent chunk
            os.pwrite(fd, os.urandom(CHUNK), 3 * CHUNK)       # a whole zero chunk
            p = h.run(["fallocate", "--punch-hole", "-o", str(5 * CHUNK), "-l", str(CHUNK),
                       disk], timeout=30)
            if p.returncode != 0:
                fail(f"fallocate --punch-hole through the mount: {p.stderr_text.strip()}")
            read_all(disk)
            size = os.path.getsize(disk)
            h.wait_until(lambda: int(xattr(disk, "cached")) == size, 30, "wr: every chunk stored")
            os.fsync(fd)
            expect_verify(m, "wr", "ok 6 chunks verified, 3 not compared "
                          "(written through the mount)\n", "after the writes")
            os.kill(m.pid, signal.SIGKILL)
            if m.wait_exit(15) is None:
                fail(f"streamfs pid {m.pid} survived SIGKILL for 15 s")
        finally:
            try:
                os.close(fd)  # its flush fails once the daemon is dead
            except OSError:
                pass
        h.run(["fusermount3", "-u", "-z", m.mnt], timeout=30)
        m.stop(check=True, expect_rc=-signal.SIGKILL)
        with h.Mount(ws(), img) as m:
            expect_verify(m, "wr", "ok 6 chunks verified, 3 not compared "
                          "(written through the mount)\n", "after kill -9 and a remount")
        # The local image goes bad in a written chunk and in another one:
        # only the other one is reported.
        with open(os.path.join(img, "wr.img"), "r+b") as f:
            for c in (1, 2):
                f.seek(c * CHUNK + 1000)
                f.write(b"\xff\xfe")
        allow = [r"differ from the manifest"]
        with h.Mount(ws(), img, allow=allow) as m:
            expect_verify(m, "wr", f"error: verify: 1 of 6 present chunks of wr differ from "
                          f"the manifest, at offsets {2 * CHUNK}\n", "after damage")
        # Older metadata: the record starts empty, so the chunks written
        # before it count as differing; those written since do not.
        forget_written(meta)
        with h.Mount(ws(), img, allow=allow) as m:
            buf = open(meta, "rb").read()
            flags, size, chunk = meta_header(buf)
            want = h.META_BITMAP_OFFSET + 2 * ((-(-size // chunk) + 7) // 8)
            if not flags & META_FLAG_WRITTEN or len(buf) != want:
                fail(f"after a mount of older metadata: flags {flags:#x}, {len(buf)} bytes; "
                     f"expected flag {META_FLAG_WRITTEN:#x} and {want} bytes")
            offs = " ".join(str(c * CHUNK) for c in (1, 2, 3, 5))
            expect_verify(m, "wr", f"error: verify: 4 of 9 present chunks of wr differ from "
                          f"the manifest, at offsets {offs}\n", "of older metadata")
            with open(m.path("wr"), "r+b") as f:
                f.seek(5 * CHUNK)
                f.write(b"again")
            offs = " ".join(str(c * CHUNK) for c in (1, 2, 3))
            expect_verify(m, "wr", f"error: verify: 3 of 8 present chunks of wr differ from "
                          f"the manifest, at offsets {offs}\n", "after a write since")


def test_bad_manifests_refused_at_add():
    tpath = sparse_template("m.img", "dzd")
    man = make_manifest(tpath)
    text = open(man).read()
    other = sparse_template("other.img", "dz")  # another size, valid manifest
    cases = {
        "another template's manifest": open(make_manifest(other)).read(),
        "size beyond its lines": text.replace("size ", "size 1", 1),
        "missing line": "\n".join(text.splitlines()[:-1]) + "\n",
        "bad hash": text.replace(text.splitlines()[3], "xyz", 1),
        "not a manifest": "hello\n",
    }
    with h.Nginx(ws()) as ng:
        for what, body in cases.items():
            bad = os.path.join(ws().www, f"bad-{len(what)}.manifest")
            with open(bad, "w") as f:
                f.write(body)
            img = ws().mkdir("images", unique=True)
            rc, out, err = h.ctl("add", img, "x", ng.url("m.img"), "--manifest", bad)
            lines = err.splitlines()
            if rc == 0 or len(lines) != 1 or "manifest" not in lines[0]:
                fail(f"{what}: rc {rc}, stderr {err!r}")
            if os.listdir(img):
                fail(f"{what}: refused add left {os.listdir(img)}")
            h.log(f"{what}: {lines[0]}")
        img = ws().mkdir("images", unique=True)
        rc, out, err = h.ctl("add", img, "x", ng.url("m.img"), "--manifest", man,
                             "--chunk-size", "1M")
        if rc == 0 or "chunk size" not in err:
            fail(f"manifest chunk size 256K with --chunk-size 1M: rc {rc} {err!r}")


if __name__ == "__main__":
    h.main(globals())
