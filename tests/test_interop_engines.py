"""Round trips with the peer engines: ``isobox save`` archives loaded by podman and dockerd,
and their ``save`` archives imported by isobox, with the layer diff IDs (and the image ID, the
config digest) that isobox reports.

Nothing runs a container: the loaded images are compared through ``podman image inspect`` /
``docker image inspect``, and the whiteouts of the layered image are checked in the engines'
own layer folders (read only).

Isolation (see /work/shared/notes/peers.md):

* podman gets its own storage.conf and containers.conf (graphroot, runroot, tmp_dir and locks
  under the test's folder). Podman 4.3 still writes its blob-info cache to
  ``/var/lib/containers/cache`` and extracts archives under ``/var/tmp`` whatever its config
  says, so every podman command runs in a private mount namespace where folders of the test
  are bound over ``/var/lib`` and ``/var/tmp``.
* dockerd (one per module) has data-root, exec-root, pidfile, socket and trust key under a
  temporary folder, no iptables, no bridge, no ip forwarding. It would still create
  ``/run/docker/plugins`` and (through the containerd it supervises) ``/opt/containerd``, so it
  runs in a private mount namespace with folders of the test bound over ``/run`` and ``/opt``;
  its mounts die with that namespace. It is stopped with SIGTERM (then SIGKILL) at teardown,
  and the teardown checks that no process and no mount of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import require_tool
from imagekit import d, f, hard, oci_layout, sym, tar_bytes
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore

pytestmark = [pytest.mark.root, pytest.mark.tools, pytest.mark.timeout(90)]

DOCKER_CLI = "/usr/bin/docker"  # /usr/local/bin/docker (another client) may come first in PATH
CMD_TIMEOUT = 60
DOCKERD_START_TIMEOUT = 30.0
DOCKERD_STOP_TIMEOUT = 20.0

LAYERED = "interop/layered:1"
FORMATS = ["oci", "docker"]


# ---- helpers ------------------------------------------------------------------------------


def run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=env, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


def isobox(*args: str) -> str:
    return run([sys.executable, "-m", "isobox.cli.main", *args], env=os.environ.copy()).stdout


def isobox_inspect(ref: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(isobox("image", "inspect", ref))[0]
    return out


def diff_ids(info: dict[str, Any]) -> list[str]:
    return [la["diff_id"] for la in info["layers"]]


def private_mounts(binds: dict[str, Path], argv: list[str]) -> list[str]:
    """``argv`` in a new mount namespace (private propagation) where each host folder named
    in ``binds`` is covered by a folder of ours: nothing the command writes there reaches the
    host, and every mount it makes disappears with the namespace."""
    script = (
        'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 125; shift 2; done; '
        'shift; exec "$@"'
    )
    pairs: list[str] = []
    for target, source in binds.items():
        assert Path(target).is_dir(), f"{target} missing on the host"
        source.mkdir(parents=True, exist_ok=True)
        pairs += [str(source), target]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *pairs,
            "--", *argv]


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4]
            if point == str(root) or point.startswith(prefix):
                found.append(point)
    return found


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def assert_whiteouts_applied(top_diff: Path) -> None:
    """The second layer of the layered image, as an engine stored it for overlayfs: the
    deleted file is a whiteout (char 0:0), the opaque folder carries the opaque xattr, and
    no ``.wh.`` file was stored as such."""
    st = os.lstat(top_diff / "etc" / "remove-me")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "file whiteout not converted"
    assert os.getxattr(top_diff / "opq", "trusted.overlay.opaque") == b"y", "opaque dir lost"
    assert (top_diff / "etc" / "second").read_text() == "2"
    assert (top_diff / "opq" / "new").read_text() == "new"
    assert not list(top_diff.rglob(".wh.*")), "whiteout marker files stored verbatim"


# ---- isobox images ------------------------------------------------------------------------


@pytest.fixture
def images(isobox_env: Path, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """busybox (bootstrapped, one gzip layer) and a 2-layer image built by hand with a file
    whiteout and an opaque folder in its second layer: what ``isobox image inspect`` says."""
    bootstrap_busybox(ImageStore(isobox_env))
    base = tar_bytes([
        d("bin"), f("bin/tool", "#!/bin/sh\necho tool\n", 0o755), sym("bin/link", "/etc/motd"),
        d("etc"), f("etc/motd", "one\n"), hard("etc/motd-hard", "etc/motd"),
        f("etc/remove-me", "x"),
        d("opq"), f("opq/old", "old"),
    ])
    top = tar_bytes([
        d("etc"), f("etc/.wh.remove-me", ""), f("etc/second", "2"),
        d("opq"), f("opq/.wh..wh..opq", ""), f("opq/new", "new"),
    ])
    oci_layout(tmp_path / "layered-src", [base, top])
    isobox("import", str(tmp_path / "layered-src"), LAYERED)
    out = {"busybox:latest": isobox_inspect("busybox:latest"), LAYERED: isobox_inspect(LAYERED)}
    assert len(out[LAYERED]["layers"]) == 2
    return out


def isobox_save(ref: str, folder: Path, fmt: str) -> Path:
    out = folder / f"{ref.replace('/', '_').replace(':', '_')}.{fmt}.tar"
    isobox("save", ref, "-o", str(out), "--format", fmt)
    return out


def oci_archive_ids(archive: Path) -> tuple[str, str]:
    """The manifest and config digests an OCI archive names (its single image)."""
    with tarfile.open(archive) as tar:

        def read(name: str) -> Any:
            fh = tar.extractfile(name)
            assert fh is not None, f"{name} missing from {archive}"
            return json.load(fh)

        manifest_digest: str = read("index.json")["manifests"][0]["digest"]
        manifest = read("blobs/sha256/" + manifest_digest.split(":")[1])
        return manifest_digest, str(manifest["config"]["digest"])


# ---- podman -------------------------------------------------------------------------------


@dataclass
class Podman:
    root: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = private_mounts(
            {"/var/lib": self.root / "var-lib", "/var/tmp": self.root / "var-tmp"},
            ["podman", *args],
        )
        return run(argv, env=self.env, check=check)

    def inspect(self, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self("image", "inspect", ref).stdout)[0]
        return out

    def layer_diff(self, diff_id: str) -> Path:
        layers = json.loads((self.root / "graph" / "overlay-layers" / "layers.json").read_text())
        ids = [la["id"] for la in layers if la.get("diff-digest") == diff_id]
        assert len(ids) == 1, f"podman holds {len(ids)} layers with diff ID {diff_id}"
        return self.root / "graph" / "overlay" / ids[0] / "diff"


def podman_env(root: Path, runtime: str | None = None) -> dict[str, str]:
    """Configuration that keeps podman's state, locks, events and temporary files under
    ``root``; returns the environment that points podman at it."""
    runtime_line = f'runtime = "{runtime}"\n        ' if runtime else ""
    (root / "tmpdir").mkdir(parents=True, exist_ok=True)
    (root / "storage.conf").write_text(textwrap.dedent(f"""\
        [storage]
        driver = "overlay"
        graphroot = "{root}/graph"
        runroot = "{root}/run"
        """))
    (root / "containers.conf").write_text(textwrap.dedent(f"""\
        [containers]
        default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

        [engine]
        cgroup_manager = "cgroupfs"
        events_logger = "file"
        events_logfile_path = "{root}/events.log"
        lock_type = "file"
        {runtime_line}tmp_dir = "{root}/tmp"
        image_copy_tmp_dir = "{root}/tmpdir"
        static_dir = "{root}/graph/libpod"
        volume_path = "{root}/graph/volumes"

        [network]
        network_config_dir = "{root}/networks"
        """))
    env = os.environ.copy()
    env.update(
        CONTAINERS_CONF=str(root / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
        TMPDIR=str(root / "tmpdir"),
    )
    return env


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    require_tool("podman")
    root = tmp_path / "podman"
    env = podman_env(root)
    yield Podman(root, env)
    assert mounts_under(root) == [], "podman left mounts behind"
    assert processes_mentioning(str(root)) == [], "podman left processes behind"


@pytest.mark.parametrize("fmt", FORMATS)
def test_podman_loads_isobox_save(
    fmt: str, images: dict[str, dict[str, Any]], podman: Podman, tmp_path: Path
) -> None:
    require_tool("podman")
    for ref, info in images.items():
        archive = isobox_save(ref, tmp_path, fmt)
        out = podman("load", "-i", str(archive))
        assert "Loaded image" in out.stdout, out.stdout + out.stderr
        loaded = podman.inspect(info["id"])
        assert "sha256:" + loaded["Id"] == info["id"]  # the config bytes kept: same image ID
        assert loaded["RootFS"]["Layers"] == diff_ids(info)
        assert any(t.endswith("/" + ref) for t in loaded["RepoTags"]), loaded["RepoTags"]
        if fmt == "oci":
            assert loaded["Digest"] == info["digest"]  # the manifest bytes kept too
    assert_whiteouts_applied(podman.layer_diff(diff_ids(images[LAYERED])[1]))


@pytest.mark.parametrize("podman_format", ["docker-archive", "oci-archive"])
def test_isobox_imports_podman_save(
    podman_format: str, images: dict[str, dict[str, Any]], podman: Podman, tmp_path: Path
) -> None:
    require_tool("podman")
    for ref, info in images.items():
        podman("load", "-i", str(isobox_save(ref, tmp_path, "docker")))
        theirs = podman.inspect(ref)
        out = tmp_path / f"podman-{podman_format}.tar"
        out.unlink(missing_ok=True)
        podman("save", "--format", podman_format, "-o", str(out), ref)
        name = f"from-podman/{ref.split('/')[-1].split(':')[0]}:{podman_format}"
        isobox("import", str(out), name)
        back = isobox_inspect(name)
        assert diff_ids(back) == theirs["RootFS"]["Layers"] == diff_ids(info)
        if podman_format == "docker-archive":
            assert back["id"] == "sha256:" + theirs["Id"] == info["id"]
        else:
            # Podman converts the stored docker manifest to OCI and re-serialises the config
            # on the way out, so the IDs differ from the original; isobox must keep podman's
            # bytes as they are.
            assert (back["digest"], back["id"]) == oci_archive_ids(out)


# ---- dockerd ------------------------------------------------------------------------------


@dataclass
class Docker:
    root: Path
    sock: Path
    env: dict[str, str]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([DOCKER_CLI, "-H", f"unix://{self.sock}", *args], env=self.env, check=check)

    def inspect(self, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self("image", "inspect", ref).stdout)[0]
        return out

    def forget(self, image_id: str) -> None:
        """Remove the image if a previous test loaded it, so that the next load is real."""
        if self("image", "inspect", image_id, check=False).returncode == 0:
            self("rmi", "-f", image_id)

    def layer_diff(self, chain_id: str) -> Path:
        data = self.root / "data"
        layerdb = data / "image" / "overlay2" / "layerdb" / "sha256" / chain_id.split(":")[1]
        return data / "overlay2" / (layerdb / "cache-id").read_text().strip() / "diff"


def _log_tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_dockerd(proc: subprocess.Popen[bytes], root: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DOCKERD_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # The containerd that dockerd supervises runs in a session of its own: if dockerd had
    # to be killed it may outlive it. End it by its pid, only if it is ours.
    pidfile = root / "exec" / "containerd" / "containerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if pid not in processes_mentioning(str(root)):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pid in processes_mentioning(str(root)):
            time.sleep(0.05)


def assert_no_leftovers(root: Path, what: str, log: Path | None = None) -> None:
    """No process (a shim, conmon, a container) and no mount mentions the engine's folder.
    Processes found are killed (they are this test's: their command line names its
    folder), then the test fails."""
    left = processes_mentioning(f"{root}/")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stuck = mounts_under(root)
    tail = _log_tail(log) if log else ""
    assert left == [], f"{what} left processes {left}:\n{tail}"
    assert stuck == [], f"{what} left mounts {stuck}"


@contextlib.contextmanager
def running_dockerd(root: Path, runtimes: dict[str, Any] | None = None) -> Iterator[Docker]:
    """A dockerd with all its state under ``root`` that leaves the host's network alone;
    stopped on exit, with no process or mount of it left behind."""
    require_tool("dockerd")
    assert Path(DOCKER_CLI).is_file(), f"{DOCKER_CLI} (Debian's docker.io client) is missing"
    sock = root / "docker.sock"
    config: dict[str, Any] = {
        "data-root": str(root / "data"),
        "exec-root": str(root / "exec"),
        "pidfile": str(root / "docker.pid"),
        "hosts": [f"unix://{sock}"],
        "storage-driver": "overlay2",
        "deprecated-key-path": str(root / "key.json"),  # else /etc/docker/key.json
        # Leave the host's network alone: no iptables rules, no docker0, no sysctl.
        "iptables": False,
        "ip6tables": False,
        "ip-forward": False,
        "ip-masq": False,
        "bridge": "none",
    }
    if runtimes:
        config["runtimes"] = runtimes
    (root / "daemon.json").write_text(json.dumps(config, indent=2))
    env = os.environ.copy()
    env["DOCKER_CONFIG"] = str(root / "client")  # not /root/.docker
    docker = Docker(root, sock, env)
    log = root / "dockerd.log"
    argv = private_mounts(
        {"/run": root / "host-run", "/opt": root / "host-opt"},
        ["dockerd", "--config-file", str(root / "daemon.json")],
    )
    started = time.monotonic()
    with open(log, "wb") as logfh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logfh, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dockerd exited {proc.returncode} while starting:\n{_log_tail(log)}")
            if sock.exists() and docker("version", check=False).returncode == 0:
                break
            if time.monotonic() - started > DOCKERD_START_TIMEOUT:
                pytest.fail(
                    f"dockerd not answering after {DOCKERD_START_TIMEOUT:.0f} s:\n"
                    f"{_log_tail(log)}"
                )
            time.sleep(0.1)
        sys.stderr.write(f"\ndockerd ready in {time.monotonic() - started:.2f} s\n")
        yield docker
    finally:
        if proc.poll() is None:
            ids = docker("ps", "-aq", check=False).stdout.split()
            if ids:
                docker("rm", "--force", *ids, check=False)
        _stop_dockerd(proc, root)
        assert_no_leftovers(root, "dockerd", log)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    with running_dockerd(tmp_path_factory.mktemp("dockerd")) as docker:
        yield docker


@pytest.mark.parametrize("fmt", FORMATS)
def test_docker_loads_isobox_save(
    fmt: str, images: dict[str, dict[str, Any]], dockerd: Docker, tmp_path: Path
) -> None:
    require_tool("dockerd")
    for ref, info in images.items():
        dockerd.forget(info["id"])
        archive = isobox_save(ref, tmp_path, fmt)
        out = dockerd("load", "-i", str(archive), check=False)
        assert out.returncode == 0, (
            f"docker load of isobox's --format {fmt} archive of {ref} failed: "
            f"{out.stderr.strip()}"
        )
        loaded = dockerd.inspect(info["id"])
        assert loaded["Id"] == info["id"]  # docker's image ID is the config digest
        assert loaded["RootFS"]["Layers"] == diff_ids(info)
        assert ref in loaded["RepoTags"], loaded["RepoTags"]
    top = images[LAYERED]["layers"][1]
    assert_whiteouts_applied(dockerd.layer_diff(top["chain_id"]))


def test_isobox_imports_docker_save(
    images: dict[str, dict[str, Any]], dockerd: Docker, tmp_path: Path
) -> None:
    require_tool("dockerd")
    for ref, info in images.items():
        dockerd.forget(info["id"])
        dockerd("load", "-i", str(isobox_save(ref, tmp_path, "docker")))
        theirs = dockerd.inspect(ref)
        out = tmp_path / "docker-save.tar"
        out.unlink(missing_ok=True)
        dockerd("save", "-o", str(out), ref)
        name = f"from-docker/{ref.split('/')[-1].split(':')[0]}:1"
        isobox("import", str(out), name)
        back = isobox_inspect(name)
        assert diff_ids(back) == theirs["RootFS"]["Layers"] == diff_ids(info)
        assert back["id"] == theirs["Id"] == info["id"]
