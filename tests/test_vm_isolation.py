"""What issue 7 must show through a real ``isoboxd`` and the CLI: ``--isolation=vm``.

The same busybox image runs under process and vm isolation with the same output; a vm
container sees the guest's kernel; its processes are not host processes (only QEMU is);
exec, logs, stats, top, stop, kill, rm, wait work the same; root in the VM reaches no
host file outside its mapped directory; QEMU killed -9 ends the container with an error and
leaks nothing. Utility VMs run under TCG here (~4-6 s a boot): one VM at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemonkit import Daemon, assert_nothing_left, busybox_daemon, isobox_cli

E2E = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1, pytest.mark.vm,
       pytest.mark.slow]



def _e2e(fn: Any) -> Any:
    for mark in E2E:
        fn = mark(fn)
    return fn


VM = ["--isolation=vm", "--network", "none"]


@pytest.fixture
def daemon(isobox_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    with busybox_daemon(isobox_env, monkeypatch.setenv) as d:
        yield d


cli = isobox_cli


def qemus(run: Path) -> list[int]:
    """QEMU processes of the utility VMs of the daemon on ``run`` (their sockets are under
    it: another engine's or benchmark's VMs on this machine are not counted)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (p / "cmdline").read_bytes()
            argv0 = cmd.split(b"\0")[0]
            if argv0.rsplit(b"/", 1)[-1].startswith(b"qemu-system") and b"isobox-c-" in cmd \
                    and os.fsencode(run) + b"/" in cmd:
                out.append(int(p.name))
    return out


def no_qemu(run: Path, timeout: float = 20.0) -> bool:
    """Every utility VM gone (a run's VM is released just after its exit is recorded)."""
    deadline = time.monotonic() + timeout
    while qemus(run):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def host_processes_running(argv: list[str]) -> list[int]:
    """Host processes whose command line is ``argv`` exactly."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "cmdline").read_bytes() == want:
                    out.append(int(p.name))
    return out


@_e2e
def test_same_output_under_process_and_vm_and_the_guest_kernel(daemon: Daemon) -> None:
    script = "echo hi; cat /etc/os-release 2>/dev/null | head -1; ls /bin | head -3; id"
    proc = cli("run", "--rm", "--isolation=process", "--network", "none", "busybox",
               "sh", "-c", script)
    vm = cli("run", "--rm", *VM, "busybox", "sh", "-c", script)
    assert vm.stdout == proc.stdout and "hi" in vm.stdout
    uname = cli("run", "--rm", *VM, "busybox", "uname", "-r").stdout.strip()
    assert uname.startswith("6.1.") and uname != os.uname().release
    assert no_qemu(daemon.run)


def _inspect(ref: str) -> dict:  # type: ignore[type-arg]
    data = json.loads(cli("inspect", ref).stdout)
    return data[0] if isinstance(data, list) else data


def _wait_state(ref: str, state: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        info = _inspect(ref)
        if info["state"] == state or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


@_e2e
def test_detached_sleep_is_no_host_process_and_the_verbs_work(daemon: Daemon) -> None:
    """``run -d --isolation=vm busybox sleep 1000``: no ``sleep`` on the host, one QEMU;
    top shows the sleep from inside; exec, logs, stats, stop, kill, wait, rm as usual."""
    sleep = ["sleep", "1000.4242"]  # no other test's sleep
    assert not host_processes_running(sleep)
    cid = cli("run", "-d", *VM, "--memory", "64m", "--cpus", "1.5", "busybox",
              "sh", "-c", f"echo started; exec {' '.join(sleep)}").stdout.strip()
    try:
        info = _wait_state(cid, "running")
        assert info["state"] == "running"
        assert host_processes_running(sleep) == []
        vms = qemus(daemon.run)
        assert len(vms) == 1
        cmd = Path(f"/proc/{vms[0]}/cmdline").read_bytes().split(b"\0")
        assert cmd[cmd.index(b"-m") + 1] == b"256" and cmd[cmd.index(b"-smp") + 1] == b"2"
        top = cli("top", cid).stdout
        assert " ".join(sleep) in top, top
        assert cli("exec", cid, "sh", "-c", "echo from-exec; uname -r").stdout.split()[0] \
            == "from-exec"
        assert cli("exec", cid, "sh", "-c", "exit 3", check=False).returncode == 3
        deadline = time.monotonic() + 10
        while "started" not in cli("logs", cid).stdout and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cli("logs", cid).stdout == "started\n"
        stats = json.loads(cli("stats", "--no-stream", "--format", "json", cid).stdout)
        stats = stats[0] if isinstance(stats, list) else stats
        assert stats["cpuUsageNs"] > 0 and stats["pids"] >= 1, stats
        assert stats["memoryLimit"] == 64 << 20 and 0 < stats["memoryBytes"] < 64 << 20
        cli("pause", cid)
        assert _inspect(cid)["state"] == "paused"
        cli("unpause", cid)
        assert _inspect(cid)["state"] == "running"
        t0 = time.monotonic()
        cli("stop", "-t", "2", cid)
        info = _inspect(cid)
        assert info["state"] == "stopped" and time.monotonic() - t0 < 30
        assert info["exitCode"] == 137, info
        assert no_qemu(daemon.run)
        # Start again (same scratch disk), then kill and wait.
        cli("start", cid)
        assert _wait_state(cid, "running")["state"] == "running"
        cli("kill", cid)
        assert cli("wait", cid).stdout.strip() == "137"
        assert no_qemu(daemon.run)
    finally:
        cli("rm", "-f", cid, check=False)
    assert_nothing_left(daemon.root, daemon.run, [cid])
    assert no_qemu(daemon.run)


@_e2e
def test_root_in_the_vm_reaches_only_its_mapped_dir(daemon: Daemon, tmp_path: Path) -> None:
    """Root with every capability (``--cap-add ALL``) in the VM: the mapped directory works
    both ways; a host file outside it is unreachable — not by path, not via /proc/1/root
    (the guest's init), not by mounting the VM's disks, which it may (they are the image, the
    layers and the scratch disk, never the host's). Inside the guest (cgroup v2, no device
    eBPF program) silo drops CAP_MKNOD, so the disks are reached through the nodes a mknod
    would make only if allowed; the mount of a tmpfs proves CAP_SYS_ADMIN is held."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host says hi\n")
    secret = tmp_path / "secret"
    secret.write_text("host-only\n")
    script = (
        "cat /data/from-host; echo vm-wrote > /data/from-vm; "
        f"cat {secret} 2>/dev/null && echo LEAK-path; "
        f"cat /proc/1/root{secret} 2>/dev/null && echo LEAK-proc1; "
        "mkdir -p /t /m && mount -t tmpfs t /t && echo mount-works; "
        "grep CapEff /proc/self/status; "
        "for n in 0 16 32 48 64; do mknod /t/vd$n b 254 $n 2>/dev/null; done; "
        "for d in /dev/vd* /t/vd*; do mount -o ro $d /m 2>/dev/null && "
        "{ grep -rl host-only /m 2>/dev/null | head -1 | grep . && echo LEAK-mount-$d; "
        "umount /m; }; done; "
        "grep -r host-only /sys/fs/cgroup 2>/dev/null | head -1; "
        "id -u; echo done")
    r = cli("run", "--rm", *VM, "--cap-add", "ALL", "-v", f"{shared}:/data", "busybox", "sh",
            "-c", script)
    assert "LEAK" not in r.stdout, r.stdout
    assert "mount-works" in r.stdout, r.stdout
    cap_eff = int(r.stdout.split("CapEff:")[1].split()[0], 16)
    assert cap_eff & (1 << 21), hex(cap_eff)  # CAP_SYS_ADMIN
    assert r.stdout.splitlines()[0] == "host says hi" and r.stdout.endswith("0\ndone\n")
    assert (shared / "from-vm").read_text() == "vm-wrote\n"
    assert no_qemu(daemon.run)


@_e2e
def test_qemu_killed_is_an_exit_with_an_error_and_nothing_leaks(daemon: Daemon) -> None:
    cid = cli("run", "-d", *VM, "busybox", "sleep", "1000").stdout.strip()
    try:
        assert _wait_state(cid, "running")["state"] == "running"
        vms = qemus(daemon.run)
        assert len(vms) == 1
        os.kill(vms[0], signal.SIGKILL)
        info = _wait_state(cid, "stopped", timeout=30)
        assert info["state"] == "stopped", info
        assert info["exitCode"] == 137 and info["error"] and "utility VM" in info["error"], \
            info
        assert no_qemu(daemon.run)
        run_uvm = daemon.run / "uvm"
        assert not run_uvm.exists() or not list(run_uvm.iterdir())
        assert not (daemon.run / "containers" / cid).exists()
    finally:
        cli("rm", "-f", cid, check=False)
    assert_nothing_left(daemon.root, daemon.run, [cid])


@_e2e
def test_scratch_carries_over_between_process_and_vm(daemon: Daemon) -> None:
    """A file written under process isolation is there under vm isolation, and what the vm
    run changed is there when the container goes back to process isolation."""
    cid = cli("create", "--isolation=process", "--network", "none", "busybox", "sh", "-c",
              "cat /note 2>/dev/null; echo $(cat /note 2>/dev/null)x > /note").stdout.strip()
    try:
        cli("start", "-a", cid)
        assert cli("start", "-a", "--isolation=vm", cid).stdout == "x\n"
        assert (daemon.root / "containers" / cid / "scratch.ext4").exists()
        # The writable layer is in scratch.ext4 now: cp refuses clearly instead of reading
        # the stale host scratch folder (it would copy "" instead of "x").
        refused = cli("cp", f"{cid}:/note", "-", check=False)
        assert refused.returncode != 0 and "cp is not available" in refused.stderr, refused
        assert cli("start", "-a", "--isolation=process", cid).stdout == "xx\n"
        assert cli("cp", f"{cid}:/note", "-").stdout.startswith("note")  # a tar again
        assert not (daemon.root / "containers" / cid / "scratch.ext4").exists()
        assert cli("start", "-a", "--isolation=vm", cid).stdout == "xxx\n"
    finally:
        cli("rm", "-f", cid, check=False)
    assert_nothing_left(daemon.root, daemon.run, [cid])


def host_taps() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("ibt")}


@_e2e
def test_vm_on_the_default_network_has_the_endpoint_address_and_leaves_no_tap(
        daemon: Daemon) -> None:
    """The guest's NIC (a tap on the default network's bridge) has the endpoint's address,
    which ``/etc/hosts`` names the container by; the gateway answers; nothing is left."""
    import ipaddress
    import re

    before = host_taps()
    out = cli("run", "--rm", "--isolation=vm", "--hostname", "vmnet", "busybox", "sh", "-c",
              "ip -4 addr show; echo ---; cat /etc/hosts; echo ---; hostname; "
              "ip route | grep default; ping -c 1 -W 5 \"$(ip route | awk '/default/{print $3}')\""
              " >/dev/null && echo gateway-answers").stdout
    addrs, hosts, rest = out.split("---\n")
    net = json.loads(cli("network", "inspect", "isobox").stdout)
    net = net[0] if isinstance(net, list) else net
    subnet = ipaddress.ip_network(net["subnet"])
    mine = [a for a in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/\d+ .*eth0", addrs)]
    assert len(mine) == 1 and ipaddress.ip_address(mine[0]) in subnet, out
    assert mine[0] != net["gateway"]
    named = [ln.split()[0] for ln in hosts.splitlines() if "vmnet" in ln.split()[1:]]
    assert named == [mine[0]], hosts
    assert rest.splitlines()[0] == "vmnet"
    assert f"default via {net['gateway']}" in rest and "gateway-answers" in rest, out
    assert no_qemu(daemon.run)
    assert host_taps() == before, "a tap is left"
    after = json.loads(cli("network", "inspect", "isobox").stdout)
    after = after[0] if isinstance(after, list) else after
    assert not after["endpoints"], after


@_e2e
def test_vm_with_host_or_container_network_is_refused_naming_network_mode(
        daemon: Daemon) -> None:
    r = cli("run", "--rm", "--isolation=vm", "--network", "host", "busybox", "true",
            check=False)
    assert r.returncode != 0 and "network.mode" in r.stderr
    info = json.loads(cli("info", "--format", "json").stdout)
    assert info["isolations"]["vm"].startswith("available"), info


def test_vm_plan_shape(tmp_path: Path) -> None:
    """The vm plan: VM size from --memory/--cpus, the process-isolation OCI config with guest
    paths only (root, mapped dirs as 9p shares), layers and scratch disk on the host."""
    from isobox.compute.plan import GUEST_SHARES, build_plan, vm_size
    from isobox.spec.compute import parse_document
    from isobox.spec.image import ImageConfig
    from isobox.storage.store import Mounts

    layer = tmp_path / "layers" / "l1" / "diff"
    layer.mkdir(parents=True)
    for d in ("upper", "work"):
        (tmp_path / "scratch" / d).mkdir(parents=True)
    mounts = Mounts([layer], tmp_path / "scratch" / "upper", tmp_path / "scratch" / "work")
    img = ImageConfig.model_validate({"architecture": "amd64", "os": "linux",
                                      "rootfs": {"type": "layers", "diff_ids": []},
                                      "config": {"Cmd": ["sh"]}})

    def plan(**fields: Any) -> Any:
        d = parse_document({"schemaVersion": "1.0", "image": "img", "isolation": "vm",
                            **fields})
        return build_plan(d, img, mounts, container_id="a" * 64, name="n", isolation="vm",
                          container_dir=tmp_path / "c", run_dir=tmp_path / "r")

    p = plan(resources={"memory": 64 << 20, "cpus": 1.5},
             mounts=[{"source": str(tmp_path), "destination": "/data", "readOnly": True}])
    assert (p.vm["memoryMib"], p.vm["cpus"]) == (256, min(2, os.cpu_count() or 1))
    assert p.vm["layers"] == [str(layer)] and p.vm["scratch"] == str(tmp_path / "c" /
                                                                     "scratch.ext4")
    silo = p.vm["silo"]
    assert silo["root"] == "/run/isobox/c/rootfs" and silo["process"]["args"] == ["sh"]
    assert p.vm["shares"] == [{"tag": "m0", "source": str(tmp_path), "readOnly": True,
                               "guest": f"{GUEST_SHARES}/m0"}]
    binds = [m for m in silo["mounts"] if m["destination"] == "/data"]
    assert binds and binds[0]["source"] == f"{GUEST_SHARES}/m0"
    assert str(tmp_path) not in json.dumps(silo)  # no host path reaches the guest
    assert silo["process"]["seccomp"] and silo["limits"]["memory"] == 64 << 20
    assert p.oci == {} and p.host == {}
    big = parse_document({"schemaVersion": "1.0", "image": "i",
                          "resources": {"memory": 1 << 30}})
    assert vm_size(big)[0] == 1024 + 192
    assert vm_size(parse_document({"schemaVersion": "1.0", "image": "i"})) == (512, 1)
