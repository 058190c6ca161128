# SPDX-License-Identifier: MIT
"""Integrity manifests through a real mount: zero chunks are present from
the start as holes, never fetched, and reported by SEEK_HOLE/SEEK_DATA;
every fetched chunk is checked, a mismatch is fetched once more and then
puts the disk in state error; bad manifests are refused at add; verify
finds corrupted local data.

Run: python3 tests/integration/test_manifest.py [test_name...]
"""

import errno
import os
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
        rc, out, err = h.ctl("add", img, "hz", ng.url("holes.img"), "--manifest",
                             ng.url("holes.img.manifest"))
        if rc != 0:
            fail(f"add --manifest failed: {err}")
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
