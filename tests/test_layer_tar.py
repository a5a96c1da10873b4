"""isobox.storage.layer_tar: unpacking hostile and ordinary layer tars, and packing them back.

Tars are built in memory with :mod:`tarfile`; everything is unpacked on the real filesystem.
Every refused layer is checked for its error type *and* for having left the world outside
``dest`` exactly as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from isobox.errors import DigestMismatch, ImageError, StoreFull, SystemError_, UnsafeLayer
from isobox.spec.image import Compression
from isobox.storage.layer_tar import (
    RUNC_DEVICES,
    PackResult,
    UnpackPolicy,
    UnpackResult,
    decompress_to,
    decompressed_digest,
    default_policy,
    pack_layer,
    unpack_layer,
)

T0 = 1_600_000_000  # a fixed mtime for built entries
Member = tuple[tarfile.TarInfo, bytes]

# --------------------------------------------------------------------------------------
# helpers


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int | None = None,
    linkname: str = "",
    mtime: int = T0,
    uid: int = 0,
    gid: int = 0,
    devmajor: int = 0,
    devminor: int = 0,
    pax: dict[str, str] | None = None,
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.linkname = linkname
    info.mtime = mtime
    info.uid, info.gid = uid, gid
    info.devmajor, info.devminor = devmajor, devminor
    if pax:
        info.pax_headers = pax
    return info, data


def d(name: str, **kw: Any) -> Member:
    return member(name, tarfile.DIRTYPE, **kw)


def f(name: str, data: bytes = b"", **kw: Any) -> Member:
    return member(name, tarfile.REGTYPE, data, **kw)


def sym(name: str, target: str) -> Member:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hard(name: str, target: str) -> Member:
    return member(name, tarfile.LNKTYPE, linkname=target)


def make_tar(*members: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class World:
    """A layer destination plus things next to it that must never change."""

    tmp: Path
    dest: Path
    outside: Path  # holds a sentinel file
    target: Path  # an empty folder hostile symlinks point at

    def unpack(
        self,
        data: bytes,
        compression: Compression = "none",
        policy: UnpackPolicy | None = None,
        dest: Path | None = None,
    ) -> UnpackResult:
        out = self.dest if dest is None else dest
        return unpack_layer(
            io.BytesIO(compress(data, compression)),
            compression,
            out,
            what="layer 0 (test)",
            policy=policy,
        )

    def snapshot(self) -> object:
        def one(p: Path) -> tuple[object, ...]:
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
            return (p.name, st.st_mode, st.st_nlink, st.st_uid, st.st_mtime_ns, data, xattrs)

        entries = [one(p) for p in (self.outside, self.target)]
        for top in (self.outside, self.target):
            entries += [one(p) for p in sorted(top.rglob("*"))]
        return entries, sorted(p.name for p in self.tmp.iterdir())


@pytest.fixture
def world(tmp_path: Path) -> World:
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    target = tmp_path / "target"
    for p in (dest, outside, target):
        p.mkdir()
    (outside / "sentinel").write_bytes(b"precious")
    os.utime(outside / "sentinel", (T0, T0))
    return World(tmp_path, dest, outside, target)


# --------------------------------------------------------------------------------------
# ordinary layers


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_unpack_contents_and_diff_id(world: World, compression: Compression) -> None:
    big = os.urandom(3 * (1 << 20) + 123)  # crosses the 1 MiB copy chunks
    data = make_tar(
        d("etc/", mode=0o750, mtime=T0 + 1),
        f("etc/hostname", b"box\n", mode=0o640, mtime=T0 + 2),
        sym("etc/abs", "/etc/passwd"),
        sym("rel", "etc/hostname"),
        f("big.bin", big),
        member("fifo", tarfile.FIFOTYPE, mode=0o620),
        f("x/y/z", b"implicit parents"),
        *(f(f"many/{i:04d}", os.urandom(i % 700)) for i in range(600)),
    )
    result = world.unpack(data, compression)

    assert result.diff_id == sha256(data)
    assert result.entries == 7 + 600
    assert result.size == 4 + len(big) + len(b"implicit parents") + sum(i % 700 for i in range(600))
    dest = world.dest
    assert (dest / "etc/hostname").read_bytes() == b"box\n"
    assert stat.S_IMODE((dest / "etc/hostname").stat().st_mode) == 0o640
    assert stat.S_IMODE((dest / "etc").stat().st_mode) == 0o750
    assert (dest / "etc").stat().st_mtime == T0 + 1  # set after its children were written
    assert (dest / "etc/hostname").stat().st_mtime == T0 + 2
    assert os.readlink(dest / "etc/abs") == "/etc/passwd"  # verbatim, never followed
    assert os.readlink(dest / "rel") == "etc/hostname"
    assert (dest / "rel").lstat().st_mtime == T0
    assert (dest / "big.bin").read_bytes() == big
    assert stat.S_ISFIFO((dest / "fifo").lstat().st_mode)
    assert stat.S_IMODE((dest / "fifo").lstat().st_mode) == 0o620
    assert (dest / "x/y/z").read_bytes() == b"implicit parents"
    assert stat.S_IMODE((dest / "x/y").stat().st_mode) == 0o755
    assert len(list((dest / "many").iterdir())) == 600


def test_diff_id_covers_trailing_padding(world: World) -> None:
    data = make_tar(f("a", b"1")) + bytes(8192) + b"trailing junk after the end marker"
    assert len(data) % 512 != 0
    compressions: tuple[Compression, ...] = ("none", "gzip", "zstd")
    for compression in compressions:
        dest = world.tmp / f"d-{compression}"
        dest.mkdir()
        result = world.unpack(data, compression, dest=dest)
        assert result.diff_id == sha256(data)


def test_empty_stream_is_an_empty_layer(world: World) -> None:
    assert world.unpack(b"").entries == 0
    assert world.unpack(make_tar()).entries == 0
    assert list(world.dest.iterdir()) == []


def test_multi_member_gzip(world: World) -> None:
    data = make_tar(f("a", b"x" * 5000), f("b", b"y" * 7000))
    blob = gzip.compress(data[:3000], mtime=0) + gzip.compress(data[3000:], mtime=0)
    result = unpack_layer(io.BytesIO(blob), "gzip", world.dest, what="layer")
    assert result.diff_id == sha256(data)
    assert (world.dest / "b").read_bytes() == b"y" * 7000


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_format(world: World, fmt: int) -> None:
    deep = "/".join(["sub" + "d" * 20] * 6) + "/file-" + "n" * 30  # > 100 bytes
    link = "/".join(["t" * 40] * 3)
    members = [f(deep, b"deep"), sym("long-link", link)]
    if fmt == tarfile.USTAR_FORMAT:
        members = [members[0]]  # ustar has no long link names
    world.unpack(make_tar(*members, fmt=fmt))
    assert (world.dest / deep).read_bytes() == b"deep"
    if fmt != tarfile.USTAR_FORMAT:
        assert os.readlink(world.dest / "long-link") == link


def test_leading_dot_slash_and_root_entry(world: World) -> None:
    data = make_tar(
        d("./", mode=0o711, mtime=T0 + 5), d("./a/"), f("./a/./b", b"b"), f("c//d", b"d")
    )
    world.unpack(data)
    assert (world.dest / "a/b").read_bytes() == b"b"
    assert (world.dest / "c/d").read_bytes() == b"d"
    st = world.dest.stat()
    assert stat.S_IMODE(st.st_mode) == 0o711
    assert st.st_mtime == T0 + 5


def test_non_utf8_names(world: World) -> None:
    raw = b"caf\xe9"
    world.unpack(make_tar(f(raw.decode("utf-8", "surrogateescape"), b"latin1")))
    assert os.listdir(os.fsencode(world.dest)) == [raw]


def test_hardlinks_share_an_inode(world: World) -> None:
    data = make_tar(
        f("bin/perl5.36", b"#!perl", mode=0o755),
        hard("bin/perl", "bin/perl5.36"),
        hard("usr/bin/perl", "./bin/perl5.36"),
        sym("bin/sh", "dash"),
        hard("bin/sh-link", "bin/sh"),  # a hardlink to a symlink links the symlink itself
    )
    world.unpack(data)
    a, b, c = (world.dest / p for p in ("bin/perl5.36", "bin/perl", "usr/bin/perl"))
    assert a.stat().st_ino == b.stat().st_ino == c.stat().st_ino
    assert a.stat().st_nlink == 3
    assert c.read_bytes() == b"#!perl"
    assert os.readlink(world.dest / "bin/sh-link") == "dash"
    assert (world.dest / "bin/sh-link").lstat().st_ino == (world.dest / "bin/sh").lstat().st_ino


def test_user_xattrs_preserved(world: World) -> None:
    binary = b"\x00\xff\x10 binary"
    data = make_tar(
        f(
            "file",
            b"x",
            pax={
                "SCHILY.xattr.user.mime": "text/plain",
                "SCHILY.xattr.user.bin": binary.decode("utf-8", "surrogateescape"),
            },
        ),
        d("dir/", pax={"SCHILY.xattr.user.tag": "d"}),
    )
    world.unpack(data)
    assert os.getxattr(world.dest / "file", "user.mime") == b"text/plain"
    assert os.getxattr(world.dest / "file", "user.bin") == binary
    assert os.getxattr(world.dest / "dir", "user.tag") == b"d"


@pytest.mark.root
def test_security_capability_and_overlay_xattrs(world: World) -> None:
    # vfs_cap_data revision 2, effective: cap_net_raw (13) permitted
    cap = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    data = make_tar(
        f(
            "ping",
            b"\x7fELF",
            mode=0o755,
            pax={
                "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                "SCHILY.xattr.trusted.overlay.redirect": "/elsewhere",
            },
        ),
    )
    world.unpack(data)
    assert os.getxattr(world.dest / "ping", "security.capability") == cap
    # a layer does not get to steer overlayfs except through whiteouts
    assert "trusted.overlay.redirect" not in os.listxattr(world.dest / "ping")


@pytest.mark.root
def test_owners_and_setuid_preserved(world: World) -> None:
    data = make_tar(
        f("usr/bin/su", b"su", mode=0o4755, uid=0, gid=0),
        f("usr/bin/wall", b"wall", mode=0o2755, uid=0, gid=5),
        d("tmp/", mode=0o1777),
        f("home/u/file", b"mine", mode=0o600, uid=1234, gid=5678),
        sym("home/u/link", "file"),
        d("home/u/", uid=1234, gid=5678, mode=0o700),
    )
    world.unpack(data)
    st = (world.dest / "usr/bin/su").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755
    st = (world.dest / "usr/bin/wall").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2755, 5)
    assert stat.S_IMODE((world.dest / "tmp").stat().st_mode) == 0o1777
    st = (world.dest / "home/u/file").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o600)
    st = (world.dest / "home/u").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o700)


def test_owners_not_preserved_when_policy_says_so(world: World) -> None:
    policy = UnpackPolicy(preserve_owners=False)
    world.unpack(make_tar(f("f", b"x", uid=1234, gid=5678)), policy=policy)
    st = (world.dest / "f").stat()
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.root
def test_allowed_device_node(world: World) -> None:
    world.unpack(make_tar(member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)))
    st = (world.dest / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666


@pytest.mark.root
def test_whiteouts_and_opaque_dirs_become_overlay_form(world: World) -> None:
    data = make_tar(
        f(".wh.gone", mode=0o600),
        d("etc/"),
        f("etc/.wh.passwd"),
        d("opq/"),
        f("opq/.wh..wh..opq"),
        f("opq/new", b"n"),
        f("implicit/.wh..wh..opq"),
        f(".wh..wh.plnk/123", b"aufs hardlink store"),
        f("etc/.wh..wh.aufs"),
    )
    result = world.unpack(data)
    assert result.entries == 9
    for path in ("gone", "etc/passwd"):
        st = (world.dest / path).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(world.dest / "opq", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(world.dest / "implicit", "trusted.overlay.opaque") == b"y"
    assert (world.dest / "opq/new").read_bytes() == b"n"
    assert sorted(os.listdir(world.dest)) == ["etc", "gone", "implicit", "opq"]
    assert os.listdir(world.dest / "etc") == ["passwd"]
    assert os.listdir(world.dest / "implicit") == []


def test_duplicate_entries_later_wins(world: World) -> None:
    data = make_tar(
        f("file", b"first"),
        f("file", b"second", mode=0o600),
        d("tree/"),
        f("tree/a/b", b"deep"),
        f("tree", b"now a file"),  # replaces a non-empty directory
        f("dir-later"),
        d("dir-later/", mode=0o700),  # a directory replaces a file
        d("same/", mode=0o755),
        f("same/kept", b"kept"),
        d("same/", mode=0o750, mtime=T0 + 9),  # a directory over a directory: metadata only
        sym("link", "file"),
        f("link", b"replaced the symlink"),
    )
    world.unpack(data)
    dest = world.dest
    assert (dest / "file").read_bytes() == b"second"
    assert stat.S_IMODE((dest / "file").stat().st_mode) == 0o600
    assert (dest / "tree").read_bytes() == b"now a file"
    assert (dest / "dir-later").is_dir()
    assert stat.S_IMODE((dest / "same").stat().st_mode) == 0o750
    assert (dest / "same").stat().st_mtime == T0 + 9
    assert (dest / "same/kept").read_bytes() == b"kept"
    assert not (dest / "link").is_symlink()
    assert (dest / "link").read_bytes() == b"replaced the symlink"


def test_entries_replacing_a_hostile_symlink_do_not_follow_it(world: World) -> None:
    before = world.snapshot()
    sentinel = str(world.outside / "sentinel")
    data = make_tar(
        sym("evil-file", sentinel),
        f("evil-file", b"overwritten?"),
        sym("evil-dir", str(world.target)),
        d("evil-dir/", mode=0o777),
        sym("evil-fifo", str(world.target / "fifo")),
        member("evil-fifo", tarfile.FIFOTYPE),
    )
    world.unpack(data)
    assert world.snapshot() == before
    assert (world.dest / "evil-file").read_bytes() == b"overwritten?"
    assert (world.dest / "evil-dir").is_dir() and not (world.dest / "evil-dir").is_symlink()


def test_default_policy() -> None:
    policy = default_policy()
    assert policy.preserve_owners == (os.geteuid() == 0)
    assert policy.allowed_devices == RUNC_DEVICES
    assert ("c", 1, 3) in policy.allowed_devices and ("b", 8, 0) not in policy.allowed_devices
    assert (policy.max_entries, policy.max_name) == (1_000_000, 4096)


# --------------------------------------------------------------------------------------
# hostile layers: refused, and nothing outside dest touched


def _pax_name(name: str, data: bytes = b"") -> Member:
    return f("placeholder", data, pax={"path": name})


def _cases(w: World) -> dict[str, tuple[list[Member], UnpackPolicy | None]]:
    out, tgt = str(w.outside), str(w.target)
    return {
        "absolute": ([f(out + "/abs-file", b"x")], None),
        "absolute-dir": ([d(tgt + "/abs-dir/")], None),
        "dotdot": ([f("../outside/dotdot", b"x")], None),
        "dotdot-inner": ([d("a/"), f("a/../../target/x", b"x")], None),
        "dotdot-pax": ([_pax_name("ok/../../target/pax", b"x")], None),
        "symlink-parent-absolute": ([sym("evil", tgt), f("evil/file", b"x")], None),
        "symlink-parent-relative": ([sym("evil", "../target"), f("evil/file", b"x")], None),
        "symlink-parent-deep": (
            [d("a/"), sym("a/b", tgt), f("a/b/c/d", b"x")],
            None,
        ),
        "symlink-parent-dir": ([sym("evil", tgt), d("evil/sub/")], None),
        "symlink-parent-symlink": ([sym("evil", tgt), sym("evil/s", "/etc/passwd")], None),
        "symlink-parent-whiteout": ([sym("evil", out), f("evil/.wh.sentinel")], None),
        "symlink-parent-opaque": ([sym("evil", tgt), f("evil/.wh..wh..opq")], None),
        "symlink-dangling-parent": ([sym("evil", tgt + "/nope"), f("evil/file", b"x")], None),
        "hardlink-absolute": ([hard("h", out + "/sentinel")], None),
        "hardlink-dotdot": ([hard("h", "../outside/sentinel")], None),
        "hardlink-missing": ([hard("h", "nope")], None),
        "hardlink-missing-dir": ([hard("h", "no/such/file")], None),
        "hardlink-through-symlink": ([sym("evil", out), hard("h", "evil/sentinel")], None),
        "hardlink-to-dir": ([d("dir/"), hard("h", "dir")], None),
        "hardlink-to-itself": ([hard("h", "h")], None),
        "block-device": ([member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)], None),
        "char-device-not-allowed": ([member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1)], None),
        "name-too-long": ([f("n" * 60)], UnpackPolicy(max_name=50)),
        "too-many-entries": ([f(f"f{i}") for i in range(4)], UnpackPolicy(max_entries=3)),
        "nul-in-name": ([_pax_name("a\x00b")], None),
        "nul-in-hardlink": (
            [f("t"), member("h", tarfile.LNKTYPE, pax={"linkpath": "t\x00x"})],
            None,
        ),
        "root-as-file": ([f(".", b"x")], None),
        "root-as-symlink": ([sym("./", tgt)], None),
        "root-as-hardlink": ([f("t"), hard("", "t")], None),
        "whiteout-dotdot": ([f(".wh...")], None),
        "unsupported-type": ([member("vol", b"V")], None),
    }


CASES = sorted(_cases(World(Path("/x"), Path("/x"), Path("/x"), Path("/x"))))


@pytest.mark.parametrize("case", CASES)
def test_hostile_layer_refused(world: World, case: str) -> None:
    members, policy = _cases(world)[case]
    before = world.snapshot()
    with pytest.raises(UnsafeLayer) as err:
        world.unpack(make_tar(*members), policy=policy)
    # names the offending entry (the last one in every case here) and gives a reason
    last = members[-1][0]
    assert err.value.entry in (last.name, last.pax_headers.get("path"))
    assert err.value.reason
    assert "layer 0 (test)" in str(err.value)
    assert world.snapshot() == before
    assert os.listdir(world.target) == []
    assert (world.outside / "sentinel").stat().st_nlink == 1


def test_symlink_attack_reason_is_clear(world: World) -> None:
    with pytest.raises(UnsafeLayer) as err:
        world.unpack(make_tar(sym("evil", str(world.target)), f("evil/file", b"x")))
    assert err.value.entry == "evil/file"
    assert "symlink" in err.value.reason
    assert os.listdir(world.target) == []


# --------------------------------------------------------------------------------------
# damaged layers: ImageError naming the layer, never a raw tarfile/zlib/zstd exception


def _sample() -> bytes:
    return make_tar(f("first", b"a" * 1000), f("second", b"b" * 3000), f("third", b"c"))


def _damaged() -> dict[str, tuple[bytes, Compression]]:
    tar = _sample()
    second = 512 + 1024  # offset of the second header
    flipped = bytearray(tar)
    flipped[second + 10] ^= 0x55  # inside the name: breaks the checksum
    bad_first = bytearray(tar)
    bad_first[0] ^= 0x55
    bad_number = bytearray(tar)
    bad_number[second + 124 : second + 136] = b"99999999999\0"  # size field not octal
    # fix the checksum so that only the number is wrong
    bad_number[second + 148 : second + 156] = b" " * 8
    chk = sum(bad_number[second : second + 512])
    bad_number[second + 148 : second + 156] = b"%06o\0 " % chk
    gz = gzip.compress(tar, mtime=0)
    gz_bad = bytearray(gz)
    gz_bad[len(gz) // 2] ^= 0xFF
    zs = zstandard.ZstdCompressor().compress(tar)
    zs_bad = bytearray(zs)
    zs_bad[len(zs) // 2] ^= 0xFF
    pax_big = make_tar(f("x", pax={"comment": "c" * (2 << 20)}))
    return {
        "truncated-in-data": (tar[: 512 + 1024 + 512 + 100], "none"),
        "truncated-in-header": (tar[: 512 + 1024 + 200], "none"),
        "truncated-no-end-marker": (tar[: 512 + 1024], "none"),
        "bad-checksum-second-header": (bytes(flipped), "none"),
        "bad-checksum-first-header": (bytes(bad_first), "none"),
        "bad-number": (bytes(bad_number), "none"),
        "random-bytes": (os.urandom(4096), "none"),
        "oversized-pax-header": (pax_big, "none"),
        "gzip-corrupt": (bytes(gz_bad), "gzip"),
        "gzip-truncated": (gz[: len(gz) // 2], "gzip"),
        "gzip-not-gzip": (tar, "gzip"),
        "gzip-trailing-garbage": (gz + b"garbage", "gzip"),
        "zstd-corrupt": (bytes(zs_bad), "zstd"),
        "zstd-truncated": (zs[: len(zs) // 2], "zstd"),
        "zstd-not-zstd": (tar, "zstd"),
    }


@pytest.mark.parametrize("case", sorted(_damaged()))
def test_damaged_layer_is_image_error(world: World, case: str) -> None:
    blob, compression = _damaged()[case]
    before = world.snapshot()
    with pytest.raises(ImageError) as err:
        unpack_layer(io.BytesIO(blob), compression, world.dest, what="layer 3 (sha256:ab12)")
    assert "layer 3 (sha256:ab12)" in str(err.value)
    assert world.snapshot() == before


def test_corrupt_header_names_the_entry(world: World) -> None:
    tar = bytearray(_sample())
    third = 512 + 1024 + 512 + 3072
    tar[third + 100] ^= 0x01  # the mode field of the third header: a bad checksum
    with pytest.raises(ImageError, match=r"bad header checksum.*'second'"):
        world.unpack(bytes(tar))


def _raw_pax_member(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    block = info.tobuf(tarfile.USTAR_FORMAT)
    return block + records + bytes(-len(records) % 512)


@pytest.mark.parametrize(
    "records",
    [
        b"garbage without a length\n",
        b"99 path=short\n",
        b"5 x\n",
        b"2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 " * 20000 + b"=x\n",  # CVE-2024-6232 shape
    ],
    ids=["no-length", "length-too-long", "no-keyword", "quadratic"],
)
def test_malformed_pax_records(world: World, records: bytes) -> None:
    data = _raw_pax_member(records) + make_tar(f("file", b"x"))
    start = time.monotonic()
    with pytest.raises(ImageError, match="PAX"):
        world.unpack(data)
    assert time.monotonic() - start < 5
    assert os.listdir(world.dest) == []


class _FailingReader(io.BytesIO):
    """Serves ``good`` bytes, then fails like a dropped network stream."""

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        if not data:
            raise OSError(5, "Input/output error")
        return data


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "layer-read-ahead"]


def test_read_error_is_wrapped_and_helper_thread_ends(world: World) -> None:
    data = make_tar(f("a", os.urandom(3 << 20)), f("b", b"b"))
    with pytest.raises(SystemError_) as err:
        unpack_layer(_FailingReader(data[: 2 << 20]), "none", world.dest, what="layer 7")
    assert err.value.op == "read" and err.value.target == "layer 7"
    assert _read_ahead_threads() == []


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_early_refusal_of_a_big_layer_stops_reading(world: World, compression: Compression) -> None:
    data = make_tar(f("/abs", b"x"), *(f(f"f{i}", os.urandom(1 << 20)) for i in range(40)))
    blob = compress(data, compression)
    src = io.BytesIO(blob)
    with pytest.raises(UnsafeLayer):
        unpack_layer(src, compression, world.dest, what="layer")
    assert _read_ahead_threads() == []
    assert src.tell() < len(blob)  # did not read the whole 40 MiB layer first


def test_sparse_files_refused(world: World) -> None:
    data = make_tar(f("sparse", b"x", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
    with pytest.raises(ImageError, match="sparse"):
        world.unpack(data)


@pytest.mark.root
def test_out_of_space_becomes_store_full(tmp_path: Path) -> None:
    """ENOSPC from a 1 MiB tmpfs (in a private mount namespace) becomes StoreFull."""
    script = (
        "import io, sys, tarfile\n"
        "from pathlib import Path\n"
        "from isobox.errors import StoreFull\n"
        "from isobox.storage.layer_tar import unpack_layer\n"
        "buf = io.BytesIO()\n"
        "with tarfile.open(fileobj=buf, mode='w') as t:\n"
        "    i = tarfile.TarInfo('big'); i.size = 4 << 20\n"
        "    t.addfile(i, io.BytesIO(bytes(i.size)))\n"
        "buf.seek(0)\n"
        "try:\n"
        "    unpack_layer(buf, 'none', Path(sys.argv[1]), what='layer')\n"
        "except StoreFull as exc:\n"
        "    print('StoreFull:', exc)\n"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1"',
            "sh",
            str(mnt),
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.startswith("StoreFull:"), proc.stdout + proc.stderr
    assert StoreFull.http_status == 507


# --------------------------------------------------------------------------------------
# whole-stream helpers


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_decompressed_digest_and_decompress_to(compression: Compression) -> None:
    data = _sample() + b"\0" * 700
    blob = compress(data, compression)
    assert decompressed_digest(io.BytesIO(blob), compression, what="l") == sha256(data)
    out = io.BytesIO()
    size = decompress_to(io.BytesIO(blob), compression, out, expect_digest=sha256(data))
    assert (size, out.getvalue()) == (len(data), data)
    with pytest.raises(DigestMismatch):
        decompress_to(io.BytesIO(blob), compression, io.BytesIO(), expect_digest=sha256(b"x"))


@pytest.mark.parametrize(
    "case", ["gzip-corrupt", "gzip-truncated", "zstd-corrupt", "zstd-truncated"]
)
def test_whole_stream_helpers_refuse_bad_data(case: str) -> None:
    blob, compression = _damaged()[case]
    with pytest.raises(ImageError, match="layer 9"):
        decompressed_digest(io.BytesIO(blob), compression, what="layer 9")
    with pytest.raises(ImageError, match="layer 9"):
        decompress_to(io.BytesIO(blob), compression, io.BytesIO(), what="layer 9")


# --------------------------------------------------------------------------------------
# packing


def _tree(world: World, *, privileged: bool) -> Path:
    """A directory tree with everything a layer can hold, made by unpacking a layer."""
    members = [
        d("bin/", mode=0o755, mtime=T0 + 1),
        f("bin/tool", b"#!tool", mode=0o4755, mtime=T0 + 2, pax={"SCHILY.xattr.user.note": "hi"}),
        hard("bin/tool-link", "bin/tool"),
        sym("bin/abs", "/usr/bin/tool"),
        d("etc/", mode=0o750),
        f("etc/conf", b"x" * 5000, mode=0o640),
        member("run-fifo", tarfile.FIFOTYPE, mode=0o600),
        f("zz-" + "long" * 40, b"long name"),
        f("caf\udce9", b"not utf-8"),
    ]
    if privileged:
        members += [
            f("home/u/secret", b"s", uid=1234, gid=5678, mode=0o600),
            member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            f(".wh.removed"),
            d("opaque/"),
            f("opaque/.wh..wh..opq"),
            f("opaque/fresh", b"f"),
            f(
                "ping",
                b"p",
                pax={
                    "SCHILY.xattr.security.capability": struct.pack(
                        "<IIIII", 0x02000001, 1 << 13, 0, 0, 0
                    ).decode("utf-8", "surrogateescape")
                },
            ),
        ]
    world.unpack(make_tar(*members))
    return world.dest


def _pack(root: Path, **kw: Any) -> tuple[bytes, PackResult]:
    out = io.BytesIO()
    result = pack_layer(root, out, **kw)
    return out.getvalue(), result


def test_pack_is_deterministic_and_well_formed(world: World) -> None:
    root = _tree(world, privileged=False)
    blob1, r1 = _pack(root)
    blob2, r2 = _pack(root)
    assert blob1 == blob2 and r1 == r2
    # a deterministic gzip header: no file name, mtime 0
    assert blob1[:3] == b"\x1f\x8b\x08" and not blob1[3] & 0x08 and blob1[4:8] == bytes(4)
    tar_bytes = gzip.decompress(blob1)
    assert r1.diff_id == sha256(tar_bytes)
    assert r1.digest == sha256(blob1) and r1.size == len(blob1)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        members = tar.getmembers()
    names = [os.fsencode(m.name) for m in members]
    assert names == sorted(names)
    assert not any(n.startswith(b"./") or n.startswith(b"/") for n in names)
    by_name = {m.name: m for m in members}
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert by_name["bin"].isdir() and by_name["bin"].mtime == T0 + 1
    assert by_name["bin/tool"].mode == 0o4755
    assert by_name["bin/tool"].pax_headers["SCHILY.xattr.user.note"] == "hi"
    assert by_name["bin/tool-link"].islnk() and by_name["bin/tool-link"].linkname == "bin/tool"
    assert by_name["bin/abs"].issym() and by_name["bin/abs"].linkname == "/usr/bin/tool"
    assert by_name["run-fifo"].isfifo()
    assert by_name["etc/conf"].size == 5000


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_pack_unpack_pack_round_trip(world: World, compression: Compression) -> None:
    root = _tree(world, privileged=False)
    blob1, r1 = _pack(root, compression=compression, overlay_whiteouts=True)
    if compression == "none":
        assert r1.digest == r1.diff_id
    again = world.tmp / "again"
    again.mkdir()
    result = unpack_layer(io.BytesIO(blob1), compression, again, what="round trip")
    assert result.diff_id == r1.diff_id
    blob2, r2 = _pack(again, compression=compression, overlay_whiteouts=True)
    assert r2 == r1 and blob2 == blob1


@pytest.mark.root
def test_round_trip_keeps_everything(world: World) -> None:
    root = _tree(world, privileged=True)
    blob1, r1 = _pack(root, compression="none", overlay_whiteouts=True)
    with tarfile.open(fileobj=io.BytesIO(blob1)) as tar:
        by_name = {m.name: m for m in tar.getmembers()}
    assert by_name[".wh.removed"].isreg() and by_name[".wh.removed"].size == 0
    assert "removed" not in by_name
    assert by_name["opaque/.wh..wh..opq"].isreg()
    assert "SCHILY.xattr.trusted.overlay.opaque" not in by_name["opaque"].pax_headers
    assert by_name["dev/null"].ischr() and by_name["dev/null"].devminor == 3
    assert (by_name["home/u/secret"].uid, by_name["home/u/secret"].gid) == (1234, 5678)
    assert "SCHILY.xattr.security.capability" in by_name["ping"].pax_headers

    again = world.tmp / "again"
    again.mkdir()
    unpack_layer(io.BytesIO(blob1), "none", again, what="round trip")
    for rel in (
        "bin/tool",
        "bin/tool-link",
        "bin/abs",
        "etc",
        "run-fifo",
        "dev/null",
        "removed",
        "opaque",
        "home/u/secret",
        "ping",
    ):
        a, b = (root / rel).lstat(), (again / rel).lstat()
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns, a.st_rdev) == (
            b.st_mode,
            b.st_uid,
            b.st_gid,
            b.st_mtime_ns,
            b.st_rdev,
        ), rel
        assert sorted(os.listxattr(root / rel, follow_symlinks=False)) == sorted(
            os.listxattr(again / rel, follow_symlinks=False)
        ), rel
    assert (again / "bin/tool").stat().st_ino == (again / "bin/tool-link").stat().st_ino
    assert os.getxattr(again / "opaque", "trusted.overlay.opaque") == b"y"
    blob2, r2 = _pack(again, compression="none", overlay_whiteouts=True)
    assert r2 == r1 and blob2 == blob1


@pytest.mark.root
def test_pack_without_overlay_whiteouts_keeps_devices_and_xattrs(world: World) -> None:
    root = _tree(world, privileged=True)
    blob, _ = _pack(root, compression="none")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        by_name = {m.name: m for m in tar.getmembers()}
    removed = by_name["removed"]
    assert removed.ischr() and (removed.devmajor, removed.devminor) == (0, 0)
    assert by_name["opaque"].pax_headers["SCHILY.xattr.trusted.overlay.opaque"] == "y"


def test_pack_clamps_mtime(world: World) -> None:
    root = _tree(world, privileged=False)
    os.utime(root / "etc/conf", (T0 + 10_000, T0 + 10_000))
    blob, _ = _pack(root, compression="none", mtime=T0 + 1)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        mtimes = {m.name: m.mtime for m in tar.getmembers()}
    assert max(mtimes.values()) == T0 + 1
    assert mtimes["etc/conf"] == T0 + 1
    assert mtimes["bin/abs"] == T0  # older ones are kept


def test_pack_never_follows_symlinks(world: World) -> None:
    (world.dest / "sub").mkdir()
    (world.dest / "sub/into-outside").symlink_to(world.outside)
    blob, _ = _pack(world.dest, compression="none")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
    assert names == ["sub", "sub/into-outside"]


# --------------------------------------------------------------------------------------
# overlayfs: the unpacked diff form does what it says when stacked


@pytest.mark.overlay
def test_overlay_stack_honours_whiteouts_and_opaque_dirs(world: World) -> None:
    lower = world.tmp / "lower"
    upper = world.tmp / "upper"
    merged = world.tmp / "merged"
    for p in (lower, upper, merged):
        p.mkdir()
    world.unpack(
        make_tar(
            f("keep", b"k"),
            f("gone", b"g"),
            d("opq/"),
            f("opq/old", b"o"),
            d("plain/"),
            f("plain/old", b"p"),
        ),
        dest=lower,
    )
    world.unpack(
        make_tar(
            f(".wh.gone"),
            d("opq/"),
            f("opq/.wh..wh..opq"),
            f("opq/new", b"n"),
            f("plain/new", b"n"),
        ),
        dest=upper,
    )
    script = (
        f'mount -t overlay overlay -o "lowerdir={upper}:{lower}" "{merged}" && '
        f'ls -A "{merged}" && echo --- && ls -A "{merged}/opq" && echo --- && '
        f'ls -A "{merged}/plain"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    top, opq, plain = (part.split() for part in proc.stdout.split("---"))
    assert top == ["keep", "opq", "plain"]  # "gone" is hidden by the whiteout
    assert opq == ["new"]  # the opaque dir hides "old"
    assert plain == ["new", "old"]  # a plain dir merges


def test_world_snapshot_sees_changes(world: World) -> None:
    """The check every hostile-layer test relies on does notice a change outside."""
    before = world.snapshot()
    (world.target / "x").write_bytes(b"")
    assert world.snapshot() != before
    os.unlink(world.target / "x")
    os.utime(world.outside / "sentinel", (T0, T0 + 1))
    assert world.snapshot() != before
