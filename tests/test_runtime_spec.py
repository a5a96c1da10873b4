"""The OCI runtime-spec config.json models: defaults, real-world documents, validation."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from isobox.errors import InvalidDocument, NotFound
from isobox.spec.runtime import (
    DEFAULT_CAPABILITIES,
    MAX_CONFIG_SIZE,
    IDMapping,
    Mount,
    NamespaceType,
    RuntimeConfig,
    check_id_mappings,
    default_config,
    dump_config,
    load_config,
    load_process,
    load_resources,
    parse_config,
)

CID = "5b0e8f0c3a1d7e2f4c6b8a9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_CAPS = list(DEFAULT_CAPABILITIES)

# A rootful `podman run --device /dev/fuse --pids-limit 2048 alpine sleep infinity` with the
# nvidia OCI hook installed in hooks.d: what podman 4.3 hands to crun/runc.
PODMAN_43: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "user": {"uid": 0, "gid": 0, "umask": 18, "additionalGids": [0, 1, 2, 3, 4, 6, 10]},
        "args": ["sleep", "infinity"],
        "env": [PATH_ENV, "TERM=xterm", "container=podman", "HOME=/root", "HOSTNAME=5b0e8f0c3a1d"],
        "cwd": "/",
        "capabilities": {
            "bounding": [
                "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
                "CAP_SETUID", "CAP_SYS_CHROOT",
            ],
            "effective": [
                "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
                "CAP_SETUID", "CAP_SYS_CHROOT",
            ],
            "permitted": [
                "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
                "CAP_SETUID", "CAP_SYS_CHROOT",
            ],
        },
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576},
            {"type": "RLIMIT_NPROC", "hard": 4194304, "soft": 4194304},
        ],
        "oomScoreAdj": 0,
        "selinuxLabel": "system_u:system_r:container_t:s0:c123,c456",
    },
    "root": {
        "path": "/var/lib/containers/storage/overlay/"
        "3f0c9a1e0d6b4a2c8e7f5d3b1a9c7e5f3d1b9a7c5e3f1d9b7a5c3e1f9d7b5a3c/merged"
    },
    "hostname": "5b0e8f0c3a1d",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/etc/hostname", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{CID}/userdata/hostname",
         "options": ["bind", "rprivate"]},
        {"destination": "/etc/resolv.conf", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{CID}/userdata/resolv.conf",
         "options": ["bind", "rprivate"]},
        {"destination": "/etc/hosts", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{CID}/userdata/hosts",
         "options": ["bind", "rprivate"]},
        {"destination": "/dev/shm", "type": "bind",
         "source": f"/var/lib/containers/storage/overlay-containers/{CID}/userdata/shm",
         "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"]},
        {"destination": "/run/.containerenv", "type": "bind",
         "source": f"/run/containers/storage/overlay-containers/{CID}/userdata/.containerenv",
         "options": ["bind", "rprivate"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"]},
    ],
    "hooks": {
        "prestart": [
            {"path": "/usr/bin/nvidia-container-toolkit",
             "args": ["nvidia-container-toolkit", "prestart"],
             "env": [PATH_ENV]},
        ],
    },
    "annotations": {
        "io.container.manager": "libpod",
        "io.kubernetes.cri-o.Created": "2023-01-12T10:01:02.123456789Z",
        "io.kubernetes.cri-o.TTY": "false",
        "io.podman.annotations.autoremove": "FALSE",
        "io.podman.annotations.init": "FALSE",
        "io.podman.annotations.privileged": "FALSE",
        "io.podman.annotations.publish-all": "FALSE",
        "org.opencontainers.image.stopSignal": "15",
    },
    "linux": {
        "sysctl": {"net.ipv4.ping_group_range": "0 0"},
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
            ],
            "pids": {"limit": 2048},
        },
        "cgroupsPath": f"machine.slice:libpod:{CID}",
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/run/netns/netns-2b7f3c1e-9a4d-6e8f-0a1b-2c3d4e5f6a7b"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
            {"type": "cgroup"},
        ],
        "devices": [
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
             "fileMode": 438, "uid": 0, "gid": 0},
        ],
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["bdflush", "io_pgetevents", "kexec_file_load", "kexec_load",
                           "migrate_pages", "move_pages", "nfsservctl", "nice", "oldfstat",
                           "pciconfig_iobase", "sysfs", "uselib", "userfaultfd", "ustat",
                           "vm86", "vm86old", "vmsplice"],
                 "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["_llseek", "accept", "accept4", "access", "brk", "close", "execve",
                           "exit_group", "futex", "openat", "read", "write"],
                 "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
            ],
        },
        "maskedPaths": [
            "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware", "/sys/fs/selinux", "/sys/dev/block",
        ],
        "readonlyPaths": [
            "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
            "/proc/sysrq-trigger",
        ],
        "mountLabel": "system_u:object_r:container_file_t:s0:c123,c456",
    },
}

SANDBOX = "8c1f2e3d4c5b6a7988a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5"
POD_UID = "0d6c4b2a-1e3f-4a5b-8c7d-9e0f1a2b3c4d"

# An nginx container of a burstable pod, as containerd 1.6's CRI plugin writes it with the
# cgroupfs driver, RuntimeDefault seccomp, a HostToContainer volume (so rootfsPropagation is
# "rslave") and a createContainer hook injected by a device plugin's runtime wrapper.
CONTAINERD_16: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "user": {"uid": 0, "gid": 0, "additionalGids": [0, 1, 2, 3, 4, 6, 10, 11, 20, 26, 27]},
        "args": ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"],
        "env": [PATH_ENV, "HOSTNAME=nginx", "NGINX_VERSION=1.23.3",
                "KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443"],
        "cwd": "/",
        "capabilities": {"bounding": DOCKER_CAPS, "effective": DOCKER_CAPS,
                         "permitted": DOCKER_CAPS},
        "apparmorProfile": "cri-containerd.apparmor.d",
        "oomScoreAdj": 999,
    },
    "root": {"path": "rootfs"},
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/etc/hosts", "type": "bind",
         "source": f"/var/lib/kubelet/pods/{POD_UID}/etc-hosts",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/dev/termination-log", "type": "bind",
         "source": f"/var/lib/kubelet/pods/{POD_UID}/containers/nginx/1a2b3c4d",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/etc/hostname", "type": "bind",
         "source": f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/hostname",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/etc/resolv.conf", "type": "bind",
         "source": f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/"
         "resolv.conf",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/dev/shm", "type": "bind",
         "source": f"/run/containerd/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/shm",
         "options": ["rbind", "rprivate", "rw"]},
        {"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
         "source": f"/var/lib/kubelet/pods/{POD_UID}/volumes/"
         "kubernetes.io~projected/kube-api-access-x7k2q",
         "options": ["rbind", "rprivate", "ro"]},
        {"destination": "/mnt/host", "type": "bind", "source": "/mnt/data",
         "options": ["rbind", "rslave", "rw"]},
    ],
    "hooks": {
        "createContainer": [
            {"path": "/usr/bin/nvidia-ctk",
             "args": ["nvidia-ctk", "hook", "update-ldcache", "--folder",
                      "/usr/lib/x86_64-linux-gnu"],
             "timeout": 10},
        ],
    },
    "annotations": {
        "io.kubernetes.cri.container-name": "nginx",
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.23",
        "io.kubernetes.cri.sandbox-id": SANDBOX,
        "io.kubernetes.cri.sandbox-name": "nginx",
        "io.kubernetes.cri.sandbox-namespace": "default",
    },
    "linux": {
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": 134217728, "swap": 134217728},
            "cpu": {"shares": 102, "quota": 50000, "period": 100000},
        },
        "cgroupsPath": f"/kubepods/burstable/pod{POD_UID}/{CID}",
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/proc/4242/ns/net"},
        ],
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["accept", "accept4", "arch_prctl", "bind", "brk", "capget",
                           "capset", "chdir", "epoll_wait", "exit_group", "openat", "read"],
                 "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0,
                           "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            ],
        },
        "rootfsPropagation": "rslave",
        "maskedPaths": [
            "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware",
        ],
        "readonlyPaths": [
            "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
            "/proc/sysrq-trigger",
        ],
    },
}


def _minimal() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(dump_config(default_config(["/bin/sh"]))))


def _error(doc: Any) -> str:
    with pytest.raises(InvalidDocument) as info:
        parse_config(json.dumps(doc))
    return str(info.value)


# --- the default --------------------------------------------------------------------------------


def test_default_config_round_trips() -> None:
    cfg = default_config(["/bin/sh", "-c", "echo hi"])
    data = dump_config(cfg)
    again = parse_config(data)
    assert again == cfg
    assert dump_config(again) == data
    assert RuntimeConfig.model_validate(cfg.model_dump(by_alias=True)) == cfg


def test_default_config_content() -> None:
    cfg = default_config(["nginx"])
    doc = json.loads(dump_config(cfg))
    assert doc["ociVersion"].startswith("1.")
    assert doc["root"] == {"path": "rootfs"}
    proc = doc["process"]
    assert proc["args"] == ["nginx"]
    assert proc["cwd"] == "/"
    assert proc["env"][0].startswith("PATH=/usr/local/sbin:") and "TERM=xterm" in proc["env"]
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["noNewPrivileges"] is True
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    caps = proc["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for name in ("bounding", "effective", "permitted"):
        assert len(caps[name]) == 14 and set(caps[name]) == set(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"]

    mounts = {m["destination"]: m for m in doc["mounts"]}
    assert list(mounts) == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
    ]
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["options"] == ["nosuid", "strictatime", "mode=755", "size=65536k"]
    assert mounts["/dev/pts"]["options"] == [
        "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5",
    ]
    assert mounts["/dev/shm"]["type"] == "tmpfs"
    assert mounts["/dev/shm"]["options"] == [
        "nosuid", "noexec", "nodev", "mode=1777", "size=65536k",
    ]
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/sys"]["options"] == ["nosuid", "noexec", "nodev", "ro"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert mounts["/sys/fs/cgroup"]["options"] == [
        "nosuid", "noexec", "nodev", "relatime", "ro",
    ]

    linux = cfg.linux
    assert linux is not None
    assert [ns.type for ns in linux.namespaces or ()] == [
        "pid", "network", "ipc", "uts", "mount", "cgroup",
    ]
    assert linux.namespace("user") is None and linux.namespace("pid") is not None
    assert linux.masked_paths is not None and "/proc/kcore" in linux.masked_paths
    assert "/sys/devices/virtual/powercap" in linux.masked_paths
    assert linux.readonly_paths == [
        "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
    ]


def test_default_config_copies_args() -> None:
    args = ["sh"]
    cfg = default_config(args)
    args.append("-x")
    assert cfg.process is not None and cfg.process.args == ["sh"]


# --- documents other engines write --------------------------------------------------------------


@pytest.mark.parametrize("doc", [PODMAN_43, CONTAINERD_16], ids=["podman-4.3", "containerd-1.6"])
def test_real_world_config_parses_and_round_trips(doc: dict[str, Any]) -> None:
    cfg = parse_config(json.dumps(doc))
    assert json.loads(dump_config(cfg)) == doc
    assert cfg.process is not None and cfg.linux is not None
    assert cfg.linux.cgroups_path == doc["linux"]["cgroupsPath"]
    assert cfg.annotations == doc["annotations"]


def test_podman_fields() -> None:
    cfg = parse_config(json.dumps(PODMAN_43))
    assert cfg.process is not None and cfg.process.user is not None
    assert cfg.process.user.umask == 18
    assert cfg.hooks is not None and cfg.hooks.prestart is not None
    assert cfg.hooks.prestart[0].path == "/usr/bin/nvidia-container-toolkit"
    linux = cfg.linux
    assert linux is not None and linux.resources is not None
    assert linux.cgroups_path is not None and linux.cgroups_path.startswith("machine.slice:")
    devices = linux.resources.devices or []
    assert [(d.allow, d.type, d.major, d.minor) for d in devices] == [
        (False, None, None, None), (True, "c", 10, 229),
    ]
    assert linux.resources.pids is not None and linux.resources.pids.limit == 2048
    assert linux.seccomp is not None and linux.seccomp.default_errno_ret == 38
    assert linux.seccomp.syscalls is not None
    assert linux.seccomp.syscalls[0].errno_ret == 1
    net = linux.namespace("network")
    assert net is not None and net.path is not None and net.path.startswith("/run/netns/")


def test_containerd_fields() -> None:
    cfg = parse_config(json.dumps(CONTAINERD_16))
    linux = cfg.linux
    assert linux is not None and linux.resources is not None
    assert linux.rootfs_propagation == "rslave"
    assert linux.resources.memory is not None and linux.resources.memory.limit == 128 << 20
    assert linux.resources.cpu is not None and linux.resources.cpu.quota == 50000
    assert linux.seccomp is not None and linux.seccomp.syscalls is not None
    arg = (linux.seccomp.syscalls[2].args or [])[0]
    assert (arg.op, arg.value, arg.value_two) == ("SCMP_CMP_MASKED_EQ", 2114060288, 0)
    assert cfg.hooks is not None and cfg.hooks.create_container is not None
    assert cfg.hooks.create_container[0].timeout == 10
    assert cfg.process is not None and cfg.process.oom_score_adj == 999


@pytest.mark.parametrize(
    "path", [f"machine.slice:libpod:{CID}", f"/default/{CID}", "system.slice:docker:abc", ""]
)
def test_cgroups_path_forms(path: str) -> None:
    doc = _minimal()
    doc["linux"]["cgroupsPath"] = path
    cfg = parse_config(json.dumps(doc))
    assert cfg.linux is not None and cfg.linux.cgroups_path == path


def test_spec_1_2_fields() -> None:
    doc = _minimal()
    doc["process"].update(
        consoleSize={"height": 25, "width": 80},
        ioPriority={"class": "IOPRIO_CLASS_IDLE", "priority": 4},
        scheduler={"policy": "SCHED_BATCH", "nice": -5, "flags": ["SCHED_FLAG_RESET_ON_FORK"]},
        execCPUAffinity={"initial": "7", "final": "0-3,7"},
    )
    doc["process"]["user"]["umask"] = 63
    doc["process"]["capabilities"]["ambient"] = ["CAP_NET_BIND_SERVICE"]
    doc["domainname"] = "example.test"
    doc["mounts"].append({
        "destination": "/data", "type": "bind", "source": "/srv/data",
        "options": ["rbind", "idmap"],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    })
    doc["linux"]["namespaces"] += [{"type": "user"}, {"type": "time"}]
    doc["linux"].update(
        uidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}],
        gidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}],
        timeOffsets={"monotonic": {"secs": 172800, "nanosecs": 0}, "boottime": {"secs": 1}},
        personality={"domain": "LINUX32"},
        intelRdt={"closID": "guaranteed_group", "l3CacheSchema": "L3:0=7f0;1=1f",
                  "memBwSchema": "MB:0=20;1=70", "enableCMT": True},
        sysctl={"net.core.somaxconn": "256"},
    )
    doc["linux"]["resources"].update(
        memory={"limit": -1, "swappiness": 0, "disableOOMKiller": False,
                "useHierarchy": True, "checkBeforeUpdate": True, "kernelTCP": -1},
        cpu={"shares": 1024, "burst": 1000, "realtimeRuntime": 950000, "cpus": "2-3",
             "mems": "0-7", "idle": 1},
        blockIO={"weight": 10, "leafWeight": 10,
                 "weightDevice": [{"major": 8, "minor": 0, "weight": 500, "leafWeight": 300}],
                 "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 600}],
                 "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 300}]},
        hugepageLimits=[{"pageSize": "2MB", "limit": 9223372036854772000}],
        network={"classID": 1048577, "priorities": [{"name": "eth0", "priority": 500}]},
        rdma={"mlx5_1": {"hcaHandles": 3, "hcaObjects": 10000}},
        unified={"io.max": "259:0 rbps=2097152 wiops=120"},
    )
    doc["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
        "listenerPath": "/run/seccomp-agent.socket",
        "listenerMetadata": "MKNOD=/dev/null",
        "architectures": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_RISCV64", "SCMP_ARCH_LOONGARCH64"],
        "syscalls": [{"names": ["mknod"], "action": "SCMP_ACT_NOTIFY"},
                     {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"}],
    }
    cfg = parse_config(json.dumps(doc))
    assert json.loads(dump_config(cfg)) == doc
    assert cfg.process is not None and cfg.process.io_priority is not None
    assert cfg.process.io_priority.class_ == "IOPRIO_CLASS_IDLE"
    assert cfg.linux is not None and cfg.linux.time_offsets is not None
    assert cfg.linux.time_offsets["monotonic"].secs == 172800


# --- unknown fields ------------------------------------------------------------------------------


def test_unknown_fields_survive_a_round_trip() -> None:
    doc = copy.deepcopy(CONTAINERD_16)
    doc["vm"] = {"hypervisor": {"path": "/usr/bin/qemu-system-x86_64"}, "kernel": {"path": "/k"}}
    doc["x-isobox-future"] = [1, "two", {"three": 3.5}]
    doc["process"]["user"]["futureField"] = True
    doc["process"]["capabilities"]["futureSet"] = ["CAP_CHOWN"]
    doc["mounts"][0]["futureMountKnob"] = "yes"
    doc["hooks"]["createContainer"][0]["hookName"] = "createContainer"
    doc["hooks"]["futureHook"] = [{"path": "/bin/true"}]
    doc["linux"]["netDevices"] = {"eth1": {"name": "ceth1"}}
    doc["linux"]["resources"]["memory"]["futureKnob"] = 7
    doc["linux"]["resources"]["devices"][0]["comment"] = "deny all"
    doc["linux"]["seccomp"]["syscalls"][0]["comment"] = "the allow list"
    doc["linux"]["seccomp"]["syscalls"][1]["args"][0]["futureArg"] = 1
    doc["linux"]["namespaces"][0]["futureNs"] = {}

    cfg = parse_config(json.dumps(doc))
    assert json.loads(dump_config(cfg)) == doc
    assert cfg.model_extra is not None and cfg.model_extra["x-isobox-future"][2] == {"three": 3.5}
    assert cfg.linux is not None and cfg.linux.model_extra == {
        "netDevices": {"eth1": {"name": "ceth1"}}
    }
    again = parse_config(dump_config(cfg))
    assert again == cfg


# --- validation: each rule names the field ------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets ``path`` (dotted, integers index lists) to ``value``."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


BAD: list[tuple[str, Mutation, str]] = [
    # ociVersion must be a 1.x SemVer
    ("version-2", _set("ociVersion", "2.0.0"), "ociVersion"),
    ("version-0", _set("ociVersion", "0.5.0-dev"), "ociVersion"),
    ("version-short", _set("ociVersion", "1.0"), "ociVersion"),
    ("version-missing", _delete("ociVersion"), "ociVersion"),
    ("root-missing", _delete("root"), "root"),
    # process
    ("args-empty", _set("process.args", []), "process.args"),
    ("args-missing", _delete("process.args"), "process.args"),
    ("cwd-relative", _set("process.cwd", "root"), "process.cwd"),
    ("cwd-missing", _delete("process.cwd"), "process.cwd"),
    ("cap-lowercase", _set("process.capabilities.bounding.0", "chown"),
     "process.capabilities.bounding[0]"),
    ("cap-mixed-case", _set("process.capabilities.ambient", ["CAP_Chown"]),
     "process.capabilities.ambient[0]"),
    ("cap-no-prefix", _set("process.capabilities.permitted.13", "AUDIT_WRITE"),
     "process.capabilities.permitted[13]"),
    ("rlimit-type", _set("process.rlimits.0.type", "RLIMIT_FILES"), "process.rlimits[0].type"),
    ("rlimit-dup", _set("process.rlimits", [
        {"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1},
        {"type": "RLIMIT_NOFILE", "hard": 2, "soft": 2},
    ]), "process.rlimits"),
    ("rlimit-soft-above-hard", _set("process.rlimits.0.soft", 4096), "process.rlimits[0]"),
    ("rlimit-negative", _set("process.rlimits.0.hard", -1), "process.rlimits[0].hard"),
    ("uid-negative", _set("process.user.uid", -1), "process.user.uid"),
    ("uid-too-big", _set("process.user.uid", 2**32), "process.user.uid"),
    ("oom-score", _set("process.oomScoreAdj", 1001), "process.oomScoreAdj"),
    ("ioprio-class", _set("process.ioPriority", {"class": "IOPRIO_CLASS_NONE", "priority": 0}),
     "process.ioPriority.class"),
    ("ioprio-level", _set("process.ioPriority", {"class": "IOPRIO_CLASS_BE", "priority": 8}),
     "process.ioPriority.priority"),
    ("sched-policy", _set("process.scheduler", {"policy": "SCHED_FAST"}),
     "process.scheduler.policy"),
    # mounts
    ("mount-dest-empty", _set("mounts.0.destination", ""), "mounts[0].destination"),
    ("mount-dest-missing", _delete("mounts.2.destination"), "mounts[2].destination"),
    ("mount-idmap-half", _set("mounts.0.uidMappings",
                              [{"containerID": 0, "hostID": 1000, "size": 10}]), "mounts[0]"),
    ("mount-idmap-overlap", lambda d: d["mounts"][0].update(
        uidMappings=[{"containerID": 0, "hostID": 1000, "size": 10},
                     {"containerID": 9, "hostID": 5000, "size": 10}],
        gidMappings=[{"containerID": 0, "hostID": 1000, "size": 10}],
    ), "mounts[0].uidMappings"),
    # hooks
    ("hook-relative", _set("hooks.poststop", [{"path": "cleanup.sh"}]), "hooks.poststop[0].path"),
    ("hook-timeout", _set("hooks.prestart", [{"path": "/bin/true", "timeout": 0}]),
     "hooks.prestart[0].timeout"),
    # annotations
    ("annotation-empty-key", _set("annotations", {"": "x"}), 'annotations[""] (key)'),
    ("annotation-value", _set("annotations", {"io.example.n": 2}),
     'annotations["io.example.n"]'),
    # linux.namespaces
    ("ns-dup", _set("linux.namespaces.1", {"type": "pid"}), "linux.namespaces"),
    ("ns-dup-path", _set("linux.namespaces", [
        {"type": "network"}, {"type": "network", "path": "/run/netns/x"},
    ]), "linux.namespaces"),
    ("ns-type", _set("linux.namespaces.1.type", "net"), "linux.namespaces[1].type"),
    ("ns-path-relative", _set("linux.namespaces.0.path", "proc/1/ns/pid"),
     "linux.namespaces[0].path"),
    # linux id mappings
    ("uidmap-container-overlap", _set("linux.uidMappings", [
        {"containerID": 0, "hostID": 100000, "size": 1000},
        {"containerID": 999, "hostID": 300000, "size": 10},
    ]), "linux.uidMappings"),
    ("gidmap-host-overlap", _set("linux.gidMappings", [
        {"containerID": 0, "hostID": 100000, "size": 1000},
        {"containerID": 5000, "hostID": 100500, "size": 10},
    ]), "linux.gidMappings"),
    ("uidmap-nested", _set("linux.uidMappings", [
        {"containerID": 0, "hostID": 100000, "size": 65536},
        {"containerID": 100, "hostID": 900000, "size": 1},
        {"containerID": 70000, "hostID": 999000, "size": 1},
    ]), "linux.uidMappings"),
    ("uidmap-zero-size", _set("linux.uidMappings", [{"containerID": 0, "hostID": 1, "size": 0}]),
     "linux.uidMappings[0].size"),
    ("uidmap-wraps", _set("linux.uidMappings", [
        {"containerID": 4294967000, "hostID": 1000, "size": 1000},
    ]), "linux.uidMappings"),
    ("uidmap-missing-field", _set("linux.uidMappings", [{"containerID": 0, "size": 1}]),
     "linux.uidMappings[0].hostID"),
    # linux.devices and the device cgroup
    ("device-type", _set("linux.devices", [{"path": "/dev/x", "type": "x", "major": 1,
                                            "minor": 1}]), "linux.devices[0].type"),
    ("device-no-major", _set("linux.devices", [{"path": "/dev/x", "type": "c", "minor": 1}]),
     "linux.devices[0]"),
    ("cgroup-device-type", _set("linux.resources.devices.0.type", "u"),
     "linux.resources.devices[0].type"),
    ("cgroup-device-access", _set("linux.resources.devices.0.access", "rwx"),
     "linux.resources.devices[0].access"),
    ("cgroup-device-allow", _delete("linux.resources.devices.0.allow"),
     "linux.resources.devices[0].allow"),
    ("weight-device", _set("linux.resources.blockIO", {"weightDevice": [{"major": 8,
                                                                         "minor": 0}]}),
     "linux.resources.blockIO.weightDevice[0]"),
    ("rdma", _set("linux.resources.rdma", {"mlx5_1": {}}), "linux.resources.rdma.mlx5_1"),
    ("rdma-odd-name", _set("linux.resources.rdma", {"mlx5-1": {}}),
     'linux.resources.rdma["mlx5-1"]'),
    ("pids-limit", _set("linux.resources.pids", {}), "linux.resources.pids.limit"),
    # seccomp
    ("seccomp-default", _set("linux.seccomp", {"defaultAction": "SCMP_ACT_DENY"}),
     "linux.seccomp.defaultAction"),
    ("seccomp-action", _set("linux.seccomp", {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "allow"}],
    }), "linux.seccomp.syscalls[0].action"),
    ("seccomp-op", _set("linux.seccomp", {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_NEQ"}]}],
    }), "linux.seccomp.syscalls[0].args[0].op"),
    ("seccomp-names", _set("linux.seccomp", {
        "defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [], "action": "SCMP_ACT_LOG"}],
    }), "linux.seccomp.syscalls[0].names"),
    ("seccomp-arch", _set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW",
                                            "architectures": ["x86_64"]}),
     "linux.seccomp.architectures[0]"),
    ("seccomp-flag", _set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW",
                                            "flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}),
     "linux.seccomp.flags[0]"),
    ("seccomp-metadata-alone", _set("linux.seccomp", {"defaultAction": "SCMP_ACT_ALLOW",
                                                      "listenerMetadata": "x"}),
     "linux.seccomp"),
    # the rest of linux
    ("propagation", _set("linux.rootfsPropagation", "bidirectional"), "linux.rootfsPropagation"),
    ("masked-relative", _set("linux.maskedPaths.0", "proc/acpi"), "linux.maskedPaths"),
    ("readonly-relative", _set("linux.readonlyPaths", ["proc/sys"]), "linux.readonlyPaths"),
    ("personality", _set("linux.personality", {"domain": "BSD"}), "linux.personality.domain"),
    ("time-offset", _set("linux.timeOffsets", {"monotonic": {"nanosecs": -1}}),
     'linux.timeOffsets.monotonic.nanosecs'),
    # wrong JSON types
    ("args-type", _set("process.args", "sh -c true"), "process.args"),
    ("linux-type", _set("linux", []), "linux"),
]


@pytest.mark.parametrize(("mutate", "where"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_config_names_the_field(mutate: Mutation, where: str) -> None:
    doc = _minimal()
    mutate(doc)
    message = _error(doc)
    assert message.startswith(f"config.json: {where}: "), message


def test_args_error_message() -> None:
    doc = _minimal()
    doc["process"]["args"] = []
    assert _error(doc).startswith("config.json: process.args: List should have at least 1 item")


def test_namespace_duplicate_message_names_entries() -> None:
    doc = _minimal()
    doc["linux"]["namespaces"].append({"type": "uts", "path": "/proc/1/ns/uts"})
    assert _error(doc) == "config.json: linux.namespaces: entries 3 and 6 are both of type 'uts'"


def test_process_is_optional() -> None:
    doc = _minimal()
    del doc["process"]
    assert parse_config(json.dumps(doc)).process is None


def test_user_may_be_omitted() -> None:
    doc = _minimal()
    del doc["process"]["user"]
    cfg = parse_config(json.dumps(doc))
    assert cfg.process is not None and cfg.process.user is None


@pytest.mark.parametrize("version", ["1.0.0", "1.0.2-dev", "1.1.0-rc.1", "1.2.0", "1.2.1+git"])
def test_accepted_versions(version: str) -> None:
    doc = _minimal()
    doc["ociVersion"] = version
    assert parse_config(json.dumps(doc)).oci_version == version


@pytest.mark.parametrize(
    "mode", ["shared", "slave", "private", "unbindable", "rshared", "rslave", "rprivate",
             "runbindable"],
)
def test_rootfs_propagation_values(mode: str) -> None:
    doc = _minimal()
    doc["linux"]["rootfsPropagation"] = mode
    cfg = parse_config(json.dumps(doc))
    assert cfg.linux is not None and cfg.linux.rootfs_propagation == mode


@pytest.mark.parametrize(
    "kind", ["pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"]
)
def test_namespace_types(kind: str) -> None:
    doc = _minimal()
    doc["linux"]["namespaces"] = [{"type": kind}]
    cfg = parse_config(json.dumps(doc))
    assert cfg.linux is not None and cfg.linux.namespace(cast(NamespaceType, kind)) is not None


def test_pipe_device_needs_no_numbers() -> None:
    doc = _minimal()
    doc["linux"]["devices"] = [{"path": "/dev/myfifo", "type": "p"}]
    cfg = parse_config(json.dumps(doc))
    assert cfg.linux is not None and cfg.linux.devices is not None
    assert cfg.linux.devices[0].major is None


# --- mount destinations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("dev/shm", "/dev/shm"),
        ("data", "/data"),
        ("./a/../b/", "/b"),
        ("../../etc/passwd", "/etc/passwd"),
        (".", "/"),
    ],
)
def test_relative_mount_destination_is_taken_from_root(given: str, normalised: str) -> None:
    doc = _minimal()
    doc["mounts"][1]["destination"] = given
    cfg = parse_config(json.dumps(doc))
    assert cfg.mounts is not None and cfg.mounts[1].destination == normalised
    assert json.loads(dump_config(cfg))["mounts"][1]["destination"] == normalised


def test_absolute_mount_destination_is_kept_as_written() -> None:
    assert Mount(destination="/a/../b//c/").destination == "/a/../b//c/"


def test_adjacent_id_ranges_are_fine() -> None:
    check_id_mappings([
        IDMapping(container_id=0, host_id=1000, size=1),
        IDMapping(container_id=1, host_id=100000, size=65535),
        IDMapping(container_id=65536, host_id=1001, size=1),
    ])


# --- load_config ---------------------------------------------------------------------------------


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(json.dumps(PODMAN_43).encode())
    cfg = load_config(path)
    assert cfg.hostname == "5b0e8f0c3a1d"


def test_load_config_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    doc = _minimal()
    doc["process"]["args"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidDocument) as info:
        load_config(path)
    assert str(info.value).startswith(
        "config.json: process.args: List should have at least 1 item"
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "Invalid JSON"),
        (b"{not json", "Invalid JSON"),
        (b"[]", "Input should be an object"),
        (b"\xff\xfe{}", "Invalid JSON"),
    ],
)
def test_load_config_not_a_config(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(InvalidDocument) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("config.json: ") and needle in message


def test_load_config_too_large(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    doc = _minimal()
    doc["annotations"] = {"pad": "x" * MAX_CONFIG_SIZE}
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidDocument, match="larger than"):
        load_config(path)


def test_load_config_at_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    text = json.dumps(_minimal())
    path.write_text(text + " " * (MAX_CONFIG_SIZE - len(text)))
    assert path.stat().st_size == MAX_CONFIG_SIZE
    assert load_config(path).oci_version


def test_load_config_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_config(tmp_path / "config.json")


def test_load_config_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()
    with pytest.raises(InvalidDocument, match="not a regular file"):
        load_config(tmp_path / "config.json")


def test_load_config_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    os.mkfifo(path)
    with pytest.raises(InvalidDocument, match="not a regular file"):
        load_config(path)


# --- process.json and resources documents --------------------------------------------------------


def test_load_process(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    path.write_text(json.dumps(CONTAINERD_16["process"] | {"terminal": True}))
    proc = load_process(path)
    assert proc.args[0] == "/docker-entrypoint.sh" and proc.terminal is True
    path.write_text(json.dumps({"args": ["sh"], "cwd": "tmp"}))
    with pytest.raises(InvalidDocument, match=r"^process\.json: cwd: "):
        load_process(path)


def test_load_resources() -> None:
    res = load_resources(json.dumps(CONTAINERD_16["linux"]["resources"]))
    assert res.cpu is not None and res.cpu.shares == 102
    with pytest.raises(InvalidDocument, match=r"^resources: pids\.limit: "):
        load_resources('{"pids": {"limit": "many"}}')
    with pytest.raises(InvalidDocument, match="larger than"):
        load_resources(" " * (MAX_CONFIG_SIZE + 1))
