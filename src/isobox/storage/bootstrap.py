"""Images built from Debian packages, with no registry: ``busybox`` and ``debian``.

``busybox:latest`` is made from Debian's ``busybox-static``: the static binary, a relative
symlink for every applet, ``/etc/passwd`` and ``/etc/group``, and the usual empty folders.
The layer is packed deterministically (sorted entries, mtime 0, gzip without timestamp) and
the config carries a fixed creation date, so the same package gives the same image digest on
every machine; bootstrapping again is a no-op.

``debian:bookworm`` is a minbase debootstrap with python3, from the Debian mirror the host's
apt is configured with (opt-in: it downloads ~40 MB of packages and takes minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from isobox.errors import IsoboxError, ToolMissing
from isobox.paths import installed_static_busybox, is_static_elf
from isobox.spec.image import ExecConfig
from isobox.storage.store import ImageRecord, ImageStore

EPOCH = "1970-01-01T00:00:00Z"
ETC_USERS = (
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
ETC_GROUPS = "root:x:0:\nnogroup:x:65534:\n"


def _busybox_version(binary: Path) -> str:
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=False).stdout
    m = re.search(r"BusyBox v([0-9][^ ]*)", out)
    return m.group(1) if m else "unknown"


def find_static_busybox(workdir: Path) -> Path:
    """Debian's static busybox: installed, or fetched with ``apt-get download``."""
    installed = installed_static_busybox()
    if installed is not None:
        return installed
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ToolMissing("no static busybox here: install Debian's busybox-static")
    proc = subprocess.run(
        ["apt-get", "download", "busybox-static"], cwd=workdir, capture_output=True, text=True,
        check=False,
    )
    debs = sorted(workdir.glob("busybox-static_*.deb"))
    if proc.returncode != 0 or not debs:
        raise ToolMissing(f"apt-get download busybox-static failed: {proc.stderr.strip()}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(workdir / "pkg")], check=True)
    binary = workdir / "pkg" / "bin" / "busybox"
    if not is_static_elf(binary):
        raise ToolMissing("the busybox-static package did not contain a static busybox")
    return binary


def busybox_rootfs(binary: Path, dest: Path) -> str:
    """Lay out a busybox root filesystem in ``dest``; returns the busybox version."""
    for d, mode in (
        ("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
        ("etc", 0o755), ("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777),
        ("root", 0o700), ("home", 0o755), ("var", 0o755), ("var/tmp", 0o1777), ("run", 0o755),
    ):
        p = dest / d
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
    shutil.copyfile(binary, dest / "bin" / "busybox")
    os.chmod(dest / "bin" / "busybox", 0o755)
    listing = subprocess.run(
        [str(binary), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in listing:
        rel = Path(applet)
        if rel.is_absolute() or ".." in rel.parts or rel == Path("bin/busybox"):
            continue
        link = dest / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(dest / "bin" / "busybox", link.parent)
        if not link.is_symlink():
            link.symlink_to(target)
    (dest / "etc" / "passwd").write_text(ETC_USERS)
    (dest / "etc" / "group").write_text(ETC_GROUPS)
    for f in ("passwd", "group"):
        os.chmod(dest / "etc" / f, 0o644)
    return _busybox_version(binary)


def bootstrap_busybox(store: ImageStore, name: str = "busybox:latest") -> ImageRecord:
    with tempfile.TemporaryDirectory(prefix="isobox-bootstrap-") as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        rootfs.mkdir()
        version = busybox_rootfs(find_static_busybox(work), rootfs)
        return _store_rootfs(
            store, rootfs, name,
            history=f"isobox image bootstrap busybox (Debian busybox-static {version})",
            exec_config=ExecConfig(
                env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                cmd=["sh"],
                labels={"org.opencontainers.image.version": version},
            ),
            created=EPOCH,
            mtime=0,
        )


def _store_rootfs(
    store: ImageStore, rootfs: Path, name: str, *, history: str, exec_config: ExecConfig,
    created: str | None = None, mtime: int | None = None,
) -> ImageRecord:
    """Pack ``rootfs`` into a gzip layer (mtimes clamped to ``mtime`` when given) and
    import it as a one-layer image named ``name``."""
    from isobox.storage.importer import layer_image
    from isobox.storage.layer_tar import pack_layer

    with tempfile.TemporaryFile() as layer:
        pack_layer(rootfs, layer, compression="gzip", mtime=mtime)
        img = layer_image(layer, "gzip", history=history, exec_config=exec_config,
                          created=created)
        return store.import_image(img, name)


def _host_mirror() -> str:
    """The Debian mirror the host's apt uses (the only one reachable here)."""
    candidates: list[str] = []
    for src in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = src.read_text()
        except OSError:
            continue
        candidates += re.findall(r"(?:URIs:|deb)\s+(\S*/debian)/?\s", text + "\n")
    return candidates[0] if candidates else "http://deb.debian.org/debian"


def bootstrap_debian(
    store: ImageStore, name: str = "debian:bookworm", suite: str = "bookworm"
) -> ImageRecord:
    """A Debian minbase image with python3, made with debootstrap (needs the mirror)."""
    if shutil.which("debootstrap") is None:
        raise ToolMissing("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="isobox-debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", suite, str(rootfs),
             _host_mirror()],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join([*proc.stdout.strip().splitlines()[-5:], proc.stderr.strip()])
            raise IsoboxError(f"debootstrap {suite} failed:\n{tail}")
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
        return _store_rootfs(
            store, rootfs, name,
            history=f"isobox image bootstrap debian (debootstrap minbase {suite} + python3)",
            exec_config=ExecConfig(
                env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                cmd=["bash"],
            ),
        )
