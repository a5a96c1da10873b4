"""Test set-up: isolated ISOBOX_ROOT / ISOBOX_RUN, and capability markers probed by trying.

Each marker in pyproject.toml names what a test needs. Before a marked test runs, the probe
for that capability *tries* it (creates a mount namespace, mounts an overlay, runs the tool)
and caches the answer. A test whose capability is missing is skipped with the probe's
reason, except with ``CI=true`` or ``ISOBOX_TEST_STRICT=1``, where it fails instead: a
missing capability can never pass silently.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

STRICT = os.environ.get("CI", "").lower() == "true" or os.environ.get(
    "ISOBOX_TEST_STRICT", ""
) not in ("", "0")


def _run(*argv: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{argv[0]}: {exc}"
    if proc.returncode != 0:
        return False, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[:200]}"
    return True, ""


@functools.cache
def probe_root() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not running as root"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.mknod(os.path.join(tmp, "null"), 0o600 | 0o020000, os.makedev(1, 3))
            os.chown(os.path.join(tmp, "null"), 1234, 1234)
        except OSError as exc:
            return False, f"root without CAP_MKNOD/CAP_CHOWN: {exc}"
    return True, ""


@functools.cache
def probe_overlay() -> tuple[bool, str]:
    ok, why = probe_root()
    if not ok:
        return ok, why
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(tmp, d))
        opts = f"lowerdir={tmp}/lower,upperdir={tmp}/upper,workdir={tmp}/work"
        # Try it in a private mount namespace so nothing is left mounted on the host.
        return _run(
            "unshare", "-m", "--propagation", "private",
            "mount", "-t", "overlay", "overlay", "-o", opts, f"{tmp}/merged",
        )


@functools.cache
def probe_tool(name: str) -> tuple[bool, str]:
    if shutil.which(name) is None:
        return False, f"{name} is not installed (make setup installs it)"
    return _run(name, "--version") if name != "debootstrap" else (True, "")


def _v2_mount() -> str | None:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


@functools.cache
def probe_cgroup1() -> tuple[bool, str]:
    """A writable v1 memory + pids + freezer hierarchy: make a cgroup, set a limit, remove."""
    ok, why = probe_root()
    if not ok:
        return ok, why
    probe = f"isobox-probe-{os.getpid()}"
    made = []
    try:
        for ctrl, f, v in (("memory", "memory.limit_in_bytes", "67108864"),
                           ("pids", "pids.max", "10"), ("freezer", "freezer.state", "THAWED"),
                           ("cpu", "cpu.cfs_quota_us", "10000")):
            d = f"/sys/fs/cgroup/{ctrl}/{probe}"
            os.mkdir(d)
            made.append(d)
            with open(f"{d}/{f}", "w") as fh:
                fh.write(v)
    except OSError as exc:
        return False, f"cgroup v1: {exc}"
    finally:
        for d in made:
            os.rmdir(d)
    return True, ""


@functools.cache
def probe_cgroup2core() -> tuple[bool, str]:
    """A cgroup v2 hierarchy where a cgroup can be made, killed and removed."""
    ok, why = probe_root()
    if not ok:
        return ok, why
    mount = _v2_mount()
    if mount is None:
        return False, "no cgroup2 mount"
    d = f"{mount}/isobox-probe-{os.getpid()}"
    try:
        os.mkdir(d)
        try:
            if not os.path.exists(f"{d}/cgroup.kill"):
                return False, "cgroup v2 without cgroup.kill (kernel < 5.14)"
        finally:
            os.rmdir(d)
    except OSError as exc:
        return False, f"cgroup v2 at {mount}: {exc}"
    return True, ""


@functools.cache
def probe_cgroup2() -> tuple[bool, str]:
    """A cgroup v2 hierarchy with the cpu, memory and pids controllers."""
    ok, why = probe_cgroup2core()
    if not ok:
        return ok, why
    mount = _v2_mount()
    with open(f"{mount}/cgroup.controllers") as fh:
        have = set(fh.read().split())
    missing = {"cpu", "memory", "pids"} - have
    if missing:
        return False, f"cgroup v2 at {mount} lacks controllers {sorted(missing)} (v1 holds them)"
    return True, ""


@functools.cache
def probe_net() -> tuple[bool, str]:
    """Network namespaces, veth and nftables: tried inside a throwaway network namespace, so
    nothing is made on the host."""
    ok, why = probe_root()
    if not ok:
        return ok, why
    for tool in ("unshare", "nft", "ip", "nsenter"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    return _run("unshare", "--net", "sh", "-c",
                "ip link add ibxprobe0 type veth peer name ibxprobe1 && "
                "nft add table ip isobox_probe && nft delete table ip isobox_probe")


# Utility-VM assets are shared by every test (a build takes ~10 s and 120 MB): they live
# outside the per-test ISOBOX_ROOT, rebuilt there only when an input changes.
UVM_TEST_DIR = os.environ.setdefault("ISOBOX_UVM_DIR", "/var/tmp/isobox-test-uvm")
# Utility-VM templates of a test run: built once per run (a boot each), in tmpfs like the
# engine's own, and removed when the run ends (guest RAM files: hundreds of MiB of RAM).
_OWN_TEMPLATES = "ISOBOX_TEMPLATE_DIR" not in os.environ
TEMPLATE_TEST_DIR = os.environ.setdefault("ISOBOX_TEMPLATE_DIR",
                                          f"/dev/shm/isobox-test-templates-{os.getpid()}")


@functools.cache
def probe_vm() -> tuple[bool, str]:
    """QEMU runs, and the utility-VM assets exist or can be built (into UVM_TEST_DIR)."""
    ok, why = _run("qemu-system-x86_64", "-version")
    if not ok:
        return ok, why
    from isobox.errors import IsoboxError
    from isobox.uvm.assets import ensure_assets

    try:
        ensure_assets()
    except IsoboxError as exc:
        return False, f"utility-VM assets: {exc}"
    return True, ""


PROBES: dict[str, Callable[[], tuple[bool, str]]] = {
    "vm": probe_vm,
    "root": probe_root,
    "overlay": probe_overlay,
    "cgroup1": probe_cgroup1,
    "cgroup2": probe_cgroup2,
    "cgroup2core": probe_cgroup2core,
    "net": probe_net,
}


def _require(ok_why: tuple[bool, str], what: str) -> None:
    ok, why = ok_why
    if ok:
        return
    msg = f"capability {what!r} missing: {why}"
    if STRICT:
        pytest.fail(f"{msg} (strict mode: CI=true or ISOBOX_TEST_STRICT=1)", pytrace=False)
    pytest.skip(msg)


def require_tool(name: str) -> None:
    """Inside a ``tools``-marked test: the named host tool must work."""
    _require(probe_tool(name), f"tool {name}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers():
        probe = PROBES.get(mark.name)
        if probe is not None:
            _require(probe(), mark.name)
        elif mark.name == "kvm":
            # Probes for these arrive with the issues that build them; until then a test
            # carrying the marker must not pass silently.
            _require((False, "no probe for this capability yet"), mark.name)


@pytest.fixture(autouse=True)
def isobox_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets a fresh ISOBOX_ROOT and ISOBOX_RUN under its temporary folder, so no
    test ever touches /var/lib/isobox or /run/isobox. Yields the root."""
    root = tmp_path / "isobox-root"
    run = tmp_path / "isobox-run"
    monkeypatch.setenv("ISOBOX_ROOT", str(root))
    monkeypatch.setenv("ISOBOX_RUN", str(run))
    yield root
    # A CLI call in the test may have started an isoboxd for this root (autostart): stop it,
    # or every such test would leave a daemon and its zygote running.
    stop_daemons_under(tmp_path)
    remove_networks_under(root, run)


def remove_networks_under(root: Path, run: Path) -> None:
    """Tear down the networks recorded in the test's state database. A container's first
    start on a network makes the default one, whose bridge and nftables rules are
    host-wide: they would outlive the test's folder. Endpoints a failed test left go first.
    A test that never touched a network pays one SQLite query."""
    import sqlite3

    db = root / "state.db"
    if not db.exists():
        return
    conn = sqlite3.connect(db)
    try:
        has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                           "name = 'networks'").fetchone() is not None
        count = conn.execute("SELECT count(*) FROM networks").fetchone()[0] if has else 0
    except sqlite3.DatabaseError:
        return  # a test that damaged its state.db on purpose made no network
    finally:
        conn.close()
    if not count:
        return
    from isobox.network.service import NetworkService

    svc = NetworkService(db, run)
    try:
        svc.recover(set())
        for net in svc.list():
            svc.remove(net["id"])
    finally:
        svc.close()


def _daemon_run_dir(pid: int) -> str | None:
    """The ISOBOX_RUN of an isoboxd process (its --run, else its environment), or None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    text = [a.decode(errors="replace") for a in argv]
    if not any(a.endswith("isoboxd") or a == "isobox.api.daemon" for a in text[:4]):
        return None
    if "--run" in text[:-1]:
        return text[text.index("--run") + 1]
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"ISOBOX_RUN="):
            return item[len(b"ISOBOX_RUN="):].decode(errors="replace")
    return None


def stop_daemons_under(base: Path, timeout: float = 10.0) -> list[int]:
    """SIGTERM (then SIGKILL) every isoboxd whose run folder is below ``base``; their
    containers' monitors are left to the test's own checks. Returns the pids stopped."""
    import signal
    import time

    prefix = str(base).rstrip("/") + "/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        run = _daemon_run_dir(int(entry.name))
        if run is not None and (run + "/").startswith(prefix):
            pids.append(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break  # gone
            if state == "Z":
                break  # exited; its parent reaps it
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    return pids


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module-scoped fixtures may start daemons too: none outlives the test session (nor
    the run's utility-VM templates)."""
    yield
    stop_daemons_under(tmp_path_factory.getbasetemp())
    if _OWN_TEMPLATES:
        import shutil

        shutil.rmtree(TEMPLATE_TEST_DIR, ignore_errors=True)


def set_paths(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Set nested keys of a JSON document: ``linux__sysctl=v`` sets ``doc["linux"]["sysctl"]``
    (missing levels are created). Returns ``doc``."""
    for path, value in changes.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return doc


@pytest.fixture(scope="module")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked layer of a freshly bootstrapped busybox image (copy it before changing it)."""
    from isobox.storage.bootstrap import bootstrap_busybox
    from isobox.storage.store import ImageStore

    store = ImageStore(tmp_path_factory.mktemp("store"))
    img = bootstrap_busybox(store)
    return store.layer_diff(img.layers[0].chain_id)
