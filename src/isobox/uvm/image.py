"""The read-only utility-VM image: Debian's python3 and libraries, busybox, the isobox
guest packages, stage 2 as ``/sbin/init``; packed as an uncompressed erofs.

Why raw erofs: measured agent-ready 3.41 s raw erofs vs 3.68 s erofs lz4hc vs 3.79 s
squashfs zstd (44 / 24 / 15 MB): disk is cheap and shared by every VM, the guest's CPU
under TCG is not (docs/uvm-design.md, section 3).
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from isobox.uvm.assets_apt import extract, run, tool
from isobox.uvm.initramfs import GUEST_INIT

# The userland, extracted from Debian's packages (never installed on the host). libgcc-s1:
# glibc loads libgcc_s.so.1 for thread cancellation/unwinding (pthread_exit), and
# compiled extensions need it.
USERLAND = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
    "libexpat1", "zlib1g", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libzstd1",
    "libseccomp2", "libgcc-s1",
)

# What a stateless guest does not need (docs, locales, the stdlib's tests and GUI).
TRIM = (
    "usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/binfmts",
    "usr/share/initramfs-tools", "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/ossl-modules", "usr/lib/x86_64-linux-gnu/engines-3",
    "usr/lib/python3.11/test", "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter", "usr/lib/python3.11/turtledemo",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/turtle.py",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu", "etc/init.d", "usr/bin/ldd",
)

MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "var", "scratch", "mnt", "containers",
                "root", "sbin", "usr/sbin", "opt/isobox/isobox")

# isobox in the guest: these units (top-level modules/packages of isobox) and nothing
# that pulls pydantic, sqlite state or the engine (see docs/uvm-design.md, section 3).
GUEST_UNITS = ("__init__", "errors", "paths", "_sys", "jobs", "silo", "agent")

SRC = Path(__file__).resolve().parent.parent  # src/isobox


def _unit_files(src: Path) -> list[Path]:
    files: list[Path] = []
    for unit in GUEST_UNITS:
        single = src / f"{unit}.py"
        if single.is_file():
            files.append(single)
        elif (src / unit).is_dir():
            files += [p for p in (src / unit).rglob("*")
                      if p.is_file() and p.suffix in (".py", ".json")
                      and "__pycache__" not in p.parts]
    return sorted(files)


def _module_name(src: Path, f: Path) -> str:
    parts = list(f.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["isobox", *parts])


def _top_imports(src: Path, f: Path) -> list[str]:
    """Modules a file imports when it is imported (module level, not inside functions or
    ``if TYPE_CHECKING``), relative imports resolved."""
    tree = ast.parse(f.read_text(), filename=str(f))
    pkg = _module_name(src, f).split(".")
    if f.name != "__init__.py":
        pkg = pkg[:-1]
    found: list[str] = []
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            found.append(mod)
            found += [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Try):
            body += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            body += node.body + node.orelse
    return found


def guest_sources(src: Path = SRC) -> list[Path]:
    """The isobox files the image carries: the guest units, minus every module that would
    fail to import there (a module-level import of a third-party package or of isobox code
    outside the guest units, directly or through another excluded module)."""
    files = _unit_files(src)
    py = {_module_name(src, f): f for f in files if f.suffix == ".py"}
    excluded: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, f in py.items():
            if name in excluded:
                continue
            for imp in _top_imports(src, f):
                top = imp.split(".")[0]
                if top == "isobox":
                    unit = imp.split(".")[1] if imp.count(".") else "__init__"
                    bad = unit not in GUEST_UNITS or imp in excluded
                else:
                    bad = top not in sys.stdlib_module_names
                if bad:
                    excluded.add(name)
                    changed = True
                    break
    return [f for f in files if f.suffix != ".py" or _module_name(src, f) not in excluded]


def sources_hash(files: Iterable[Path], src: Path = SRC) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _busybox_applets(tree: Path, busybox: Path) -> None:
    """Symlink every applet to /bin/busybox where the packages put nothing."""
    for rel in run([str(busybox), "--list-full"]).split():
        link = tree / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def build_tree(tree: Path, debs: Iterable[Path], busybox: Path, sources: list[Path],
               src: Path = SRC) -> None:
    """Assemble the image's file tree in ``tree`` (a new folder)."""
    for deb in debs:
        extract(deb, tree)
    for rel in TRIM:
        p = tree / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for d in MOUNT_POINTS:
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "bin").mkdir(exist_ok=True)
    shutil.copyfile(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    _busybox_applets(tree, busybox)
    py3 = tree / "usr" / "bin" / "python3"
    if not py3.exists():
        py3.symlink_to("python3.11")
    etc = tree / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (etc / "hostname").write_text("isobox-uvm\n")
    init = tree / "sbin" / "init"
    if init.exists() or init.is_symlink():
        init.unlink()
    shutil.copyfile(GUEST_INIT / "stage2", init)
    init.chmod(0o755)
    dest = tree / "opt" / "isobox" / "isobox"
    for f in sources:
        out = dest / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    # ld.so.cache: libraries by soname (ctypes' CDLL("libseccomp.so.2")).
    run([tool("ldconfig"), "-r", str(tree)])
    # Byte-compile with the guest's own interpreter: Debian ships no .pyc and the image is
    # read-only, so otherwise every guest start compiles the stdlib again. unchecked-hash:
    # mtimes mean nothing in an image. Serially: `-j0` needs /dev/shm in the chroot.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    run([tool("chroot"), str(tree), "/usr/bin/python3.11", "-m", "compileall", "-q",
         "--invalidation-mode", "unchecked-hash", "/usr/lib/python3.11", "/opt/isobox"],
        env=env, timeout=900)


def make_erofs(tree: Path, out: Path) -> None:
    """Raw (uncompressed) erofs, all files root-owned, timestamps fixed."""
    run([tool("mkfs.erofs"), "--quiet", "-T0", "--all-root", str(out), str(tree)])
    os.chmod(out, 0o444)
