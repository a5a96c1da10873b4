"""Debian packages for the utility VM: resolve versions, download, extract -- never install.

Resolving asks ``apt-cache`` (~0.5 s per call here: no ``pkgcache.bin``), so the answer is
cached next to the assets, keyed by the state of apt's package lists: a cache hit of
``ensure_assets`` must not pay a second of apt for versions that cannot have changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from isobox.errors import ToolMissing, UvmAssetsError

KERNEL_META = "linux-image-amd64"

APT_LISTS = Path("/var/lib/apt/lists")
APT_ETC = Path("/etc/apt")


def tool(name: str) -> str:
    """The path of a host tool on PATH, or ToolMissing naming the Debian package."""
    found = shutil.which(name)
    if found is None:
        pkg = {"mkfs.erofs": "erofs-utils", "dpkg-deb": "dpkg", "apt-get": "apt",
               "apt-cache": "apt", "chroot": "coreutils", "ldconfig": "libc-bin",
               "qemu-system-x86_64": "qemu-system-x86"}.get(name, name)
        raise ToolMissing(f"{name} not found on PATH (Debian package {pkg}); "
                          "the utility-VM assets need it")
    return found


def run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 600,
        env: dict[str, str] | None = None) -> str:
    """Run a build step; its stderr becomes the error's message when it fails."""
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UvmAssetsError(f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-600:]
        raise UvmAssetsError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {tail}")
    return proc.stdout


def lists_stamp() -> str:
    """A hash of apt's view of the archive: the package lists and the apt configuration
    (sources, preferences). Any ``apt-get update`` that changes an index changes it."""
    h = hashlib.sha256()
    for d in (APT_LISTS, APT_ETC):
        try:
            entries = sorted(p for p in d.rglob("*") if p.is_file() and "partial" not in p.parts)
        except OSError:
            entries = []
        for p in entries:
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve(packages: Sequence[str], cache: Path) -> dict[str, str]:
    """``{package: candidate version}`` for the kernel (the versioned package the
    ``linux-image-amd64`` metapackage depends on, under the key ``kernel``'s value) and
    ``packages``; cached in ``cache`` by :func:`lists_stamp`."""
    stamp = lists_stamp()
    want = sorted(packages)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp and saved.get("packages") == want:
            return dict(saved["versions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    out = run([tool("apt-cache"), "depends", KERNEL_META])
    kernels = re.findall(r"^\s*Depends:\s*(linux-image-\d\S*)", out, re.M)
    if not kernels:
        raise UvmAssetsError(f"apt-cache depends {KERNEL_META}: no versioned linux-image "
                           "package (is the Debian archive in apt's sources?)")
    names = [kernels[0], *want]
    out = run([tool("apt-cache"), "policy", *names])
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1].split(":")[0]
        elif current and line.strip().startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            if cand != "(none)":
                versions[current] = cand
    missing = [n for n in names if n not in versions]
    if missing:
        raise UvmAssetsError(f"no installable version of {', '.join(missing)} in apt's lists "
                           "(run apt-get update?)")
    result = {"kernel": kernels[0], **versions}
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "packages": want, "versions": result}))
    os.replace(tmp, cache)
    return result


def deb_path(debs: Path, name: str, version: str) -> Path:
    return debs / f"{name}_{version.replace(':', '%3a')}.deb"


def download(pins: dict[str, str], debs: Path) -> dict[str, Path]:
    """The .deb of each ``{name: version}`` in the cache folder ``debs``, fetched with
    ``apt-get download`` (which checks each file against the signed index) when absent."""
    debs.mkdir(parents=True, exist_ok=True)
    paths = {n: deb_path(debs, n, v) for n, v in pins.items()}
    absent = [n for n, p in paths.items() if not p.exists()]
    if absent:
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=debs) as tmp:
            run([tool("apt-get"), "-q", "download", *(f"{n}={pins[n]}" for n in absent)],
                cwd=Path(tmp))
            for f in Path(tmp).glob("*.deb"):
                fields = run([tool("dpkg-deb"), "-f", str(f), "Package", "Version"])
                info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
                name = info.get("Package", "")
                if name in paths and info.get("Version") == pins[name]:
                    os.replace(f, paths[name])
        still = [n for n in absent if not paths[n].exists()]
        if still:
            raise UvmAssetsError(f"apt-get download gave no .deb for {', '.join(still)}")
    return paths


def prune(debs: Path, keep: Sequence[Path]) -> None:
    """Drop cached .debs no current asset needs (a kernel package is 70 MB)."""
    keep_names = {p.name for p in keep}
    for f in debs.glob("*.deb"):
        if f.name not in keep_names:
            f.unlink(missing_ok=True)


def extract(deb: Path, dest: Path) -> None:
    run([tool("dpkg-deb"), "-x", str(deb), str(dest)])
