"""isobox-runtime: the rest of the OCI config, each feature checked from inside a container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import set_paths

pytestmark = [pytest.mark.root, pytest.mark.cgroup1]
RUNTIME = [sys.executable, "-m", "isobox.oci.cli"]


@pytest.fixture
def bundle(tmp_path: Path, busybox_rootfs: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    shutil.copytree(busybox_rootfs, b / "rootfs", symlinks=True)
    subprocess.run([*RUNTIME, "spec"], cwd=b, check=True)
    return b


def run(bundle: Path, args: list[str], *, root: Path | None = None, **cfg_changes: Any,
        ) -> subprocess.CompletedProcess[str]:
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    set_paths(cfg, cfg_changes)
    (bundle / "config.json").write_text(json.dumps(cfg))
    state = root or bundle.parent / "state"
    out, err = bundle.parent / "o", bundle.parent / "e"
    with open(out, "w+") as o, open(err, "w+") as e:
        proc = subprocess.run([*RUNTIME, "--root", str(state), "run", "c"], cwd=bundle,
                              stdout=o, stderr=e, check=False, timeout=60)
    proc.stdout, proc.stderr = out.read_text(), err.read_text()  # type: ignore[assignment]
    return proc  # type: ignore[return-value]


def test_user_namespace_maps_root_to_an_unprivileged_host_uid(
    busybox_rootfs: Path, tmp_path: Path
) -> None:
    # As with runc: the mapped root (host uid 100000) must be able to reach the bundle, so
    # it lives in a traversable folder (pytest's own temporary folders are 0700).
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="isobox-userns-", dir="/tmp"))
    try:
        os.chmod(top, 0o711)
        bundle = top / "bundle"
        bundle.mkdir(mode=0o711)
        shutil.copytree(busybox_rootfs, bundle / "rootfs", symlinks=True)
        os.chown(bundle / "rootfs", 100000, 100000)
        subprocess.run([*RUNTIME, "spec"], cwd=bundle, check=True)
        _check_userns(bundle, tmp_path)
    finally:
        shutil.rmtree(top)


def _check_userns(bundle: Path, state: Path) -> None:
    ns = json.loads((bundle / "config.json").read_text())["linux"]["namespaces"]
    proc = run(bundle, ["sh", "-c", "id -u; cat /proc/self/uid_map"],
               linux__namespaces=[*ns, {"type": "user"}],
               linux__uidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}],
               linux__gidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}],
               root=state / "state")
    assert proc.returncode == 0, proc.stderr
    uid, *mapping = proc.stdout.split()
    assert uid == "0" and mapping == ["0", "100000", "65536"]


def test_hooks_run_in_order_with_the_state_on_stdin(bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\nstate=$(cat)\necho \"$1 $state\" >> {log}\n")
    hook.chmod(0o755)
    hooks = {kind: [{"path": str(hook), "args": ["hook.sh", kind]}]
             for kind in ("prestart", "createRuntime", "createContainer", "poststart",
                          "poststop")}
    # createContainer runs in the init, in the container's namespaces before pivot_root:
    # its path resolves on the host (the spec). startContainer runs as the container's
    # process, after pivot_root: its path resolves in the container, so give the rootfs its
    # own copy of the hook.
    inner = bundle / "rootfs" / "hook.sh"
    inner.write_text("#!/bin/sh\ncat > /dev/null; echo \"$1\" >> /hook-ran\n")
    inner.chmod(0o755)
    hooks["startContainer"] = [{"path": "/hook.sh", "args": ["hook.sh", "startContainer"]}]
    proc = run(bundle, ["true"], hooks=hooks)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["prestart", "createRuntime", "createContainer",
                                               "poststart", "poststop"]
    states = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    assert states[0]["id"] == "c"
    assert states[2]["pid"] == states[0]["pid"] > 0  # the init's host pid
    assert states[2]["bundle"] == str(bundle)
    assert (bundle / "rootfs" / "hook-ran").read_text().split() == ["startContainer"]


def test_identity_limits_and_process_settings(bundle: Path) -> None:
    proc = run(
        bundle,
        ["sh", "-c", "id -u; id -G; umask; ulimit -n; cat /proc/self/oom_score_adj; "
                     "grep CapEff /proc/self/status"],
        process__user={"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 0o027},
        process__rlimits=[{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}],
        process__oomScoreAdj=500,
    )
    assert proc.returncode == 0, proc.stderr
    uid, *rest = proc.stdout.split()
    assert uid == "1000"
    assert rest[:3] == ["1000", "10", "20"]
    assert rest[3:6] == ["0027", "256", "500"]
    assert rest[6:] == ["CapEff:", "0000000000000000"]  # a non-root user holds no caps


# A masked file that this kernel has (which ones exist depends on its configuration).
MASKED = next((p for p in ("/proc/timer_list", "/proc/keys", "/proc/sched_debug")
               if os.path.exists(p)), "/proc/timer_list")


def test_sysctl_readonly_root_masked_and_readonly_paths(bundle: Path) -> None:
    proc = run(
        bundle,
        ["sh", "-c", "cat /proc/sys/net/ipv4/ip_forward; touch /x 2>&1 | grep -c Read-only; "
                     f"wc -c < {MASKED}; touch /tmp/ok && echo tmp-writable"],
        linux__sysctl={"net.ipv4.ip_forward": "1"},
        root__readonly=True,
        mounts=[*json.loads((bundle / "config.json").read_text())["mounts"],
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev"]}],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "0", "tmp-writable"]


def test_update_events_list_ps_and_features(bundle: Path, tmp_path: Path) -> None:
    state = tmp_path / "st"

    def rt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RUNTIME, "--root", str(state), *args], cwd=bundle,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=True, timeout=60)

    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sleep", "300"]
    (bundle / "config.json").write_text(json.dumps(cfg))
    subprocess.run([*RUNTIME, "--root", str(state), "run", "-d", "c"], cwd=bundle, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)
    try:
        rt("update", "--pids-limit", "7", "--memory", "64m", "c")
        cg = json.loads((state / "c" / "state.json").read_text())["cgroup"]["paths"]
        assert Path(cg["pids"], "pids.max").read_text().strip() == "7"
        assert Path(cg["memory"], "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        stats = json.loads(rt("events", "--stats", "c").stdout)
        assert stats["type"] == "stats" and stats["data"]["pids"]["current"] == 1
        listed = json.loads(rt("list", "--format", "json").stdout)
        assert [(c["id"], c["status"]) for c in listed] == [("c", "running")]
        assert "sleep 300" in rt("ps", "c").stdout
        features = json.loads(rt("features").stdout)
        assert "seccomp" in features["linux"] and "user" in features["linux"]["namespaces"]
    finally:
        rt("delete", "--force", "c")


def test_time_namespace_and_domainname(bundle: Path) -> None:
    ns = json.loads((bundle / "config.json").read_text())["linux"]["namespaces"]
    host_ns = os.readlink("/proc/self/ns/time")
    proc = run(bundle, ["sh", "-c", "readlink /proc/self/ns/time; cat /proc/sys/kernel/domainname"],
               linux__namespaces=[*ns, {"type": "time"}], domainname="silo.example")
    assert proc.returncode == 0, proc.stderr
    time_ns, domain = proc.stdout.split()
    assert time_ns.startswith("time:[") and time_ns != host_ns
    assert domain == "silo.example"
