"""The initramfs: busybox, the modules, and ``/init`` (stage 1), packed as cpio newc.

Uncompressed: gzip saves 4 MB of a file the host page cache holds anyway, and costs the
guest ~0.1 s of decompression under TCG (docs/uvm-design.md, section 2). The archive is
written here rather than with ``cpio`` (the host has none) and is deterministic: sorted
names, mtime 0, uid/gid 0.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

GUEST_INIT = Path(__file__).resolve().parent / "guest_init"


def _header(fh: BinaryIO, name: str, mode: int, size: int, ino: int, *,
            rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    fh.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    fh.write(name.encode() + b"\0")
    fh.write(b"\0" * (-(110 + len(name) + 1) % 4))


def _entries(tree: Path) -> Iterator[Path]:
    yield from sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).parts)


def write_cpio(tree: Path, out: Path, *, console: bool = True) -> None:
    """Pack ``tree`` as a newc archive; ``console`` adds ``/dev/console`` (5, 1) so that
    ``/init`` starts with stdio on the serial console before anything is mounted."""
    with open(out, "wb") as fh:
        ino = 1
        if console:
            _header(fh, "dev", stat.S_IFDIR | 0o755, 0, ino, nlink=2)
            ino += 1
            _header(fh, "dev/console", stat.S_IFCHR | 0o600, 0, ino, rdev=(5, 1))
            ino += 1
        for p in _entries(tree):
            rel = str(p.relative_to(tree))
            if console and rel == "dev":
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                data = str(p.readlink()).encode()
            elif stat.S_ISREG(st.st_mode):
                data = p.read_bytes()
            else:
                data = b""
            mode = stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode)
            _header(fh, rel, mode, len(data), ino, nlink=2 if stat.S_ISDIR(st.st_mode) else 1)
            fh.write(data)
            fh.write(b"\0" * (-len(data) % 4))
            ino += 1
        _header(fh, "TRAILER!!!", 0, 0, 0, nlink=1)
        fh.write(b"\0" * (-fh.tell() % 512))


def build_initramfs(work: Path, out: Path, busybox: Path, mods: Path,
                    order: list[str]) -> None:
    """``/init``, ``/bin/busybox``, ``/modules.order`` and the ``.ko`` files at their
    ``kernel/...`` paths, in ``work`` (a scratch folder), packed into ``out``."""
    for d in ("bin", "dev", "proc", "sys", "newroot"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (work / "bin" / "busybox").chmod(0o755)
    init = work / "init"
    init.write_bytes((GUEST_INIT / "init").read_bytes())
    init.chmod(0o755)
    (work / "modules.order").write_text("".join(f"{m}\n" for m in order))
    for m in order:
        dest = work / m
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((mods / m).read_bytes())
    write_cpio(work, out)
