"""``isobox-runtime``: an OCI runtime with runc's command line, so Podman, containerd and
Docker can run containers on isobox's silos.

The verbs and flags follow runc: ``create start state kill delete run exec ps pause resume
update events list spec``, global ``--root --log --log-format --debug --systemd-cgroup``.
Errors go to stderr and, with ``--log``, to the log file in runc's format (one JSON object
per line with ``level``, ``msg`` and ``time`` for ``--log-format json``), because containerd's
shim and podman read the reason for a failure from there.

argparse rather than click: every container start runs this program several times, and the
stdlib parser costs nothing to import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from isobox import __version__
from isobox.errors import InvalidArgument, IsoboxError

DEFAULT_ROOT = "/run/isobox-runtime"


class _Log:
    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.debug_on = debug

    def write(self, level: str, msg: str) -> None:
        if not self.path:
            return
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now})
        else:
            line = f'time="{now}" level={level} msg="{msg}"'
        try:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
        except OSError:
            pass

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self.write("debug", msg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isobox-runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("--root", default=os.environ.get("ISOBOX_RUNTIME_ROOT", DEFAULT_ROOT))
    p.add_argument("--log", default=None)
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true")
    p.add_argument("--criu", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rootless", default="false", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb")

    def bundle_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-b", "--bundle", default=".")
        sp.add_argument("--console-socket")
        sp.add_argument("--pid-file")
        sp.add_argument("--no-pivot", action="store_true")
        sp.add_argument("--no-new-keyring", action="store_true")
        sp.add_argument("--preserve-fds", type=int, default=0)

    c = sub.add_parser("create")
    bundle_opts(c)
    c.add_argument("id")
    r = sub.add_parser("run")
    bundle_opts(r)
    r.add_argument("-d", "--detach", action="store_true")
    r.add_argument("--keep", action="store_true")
    r.add_argument("id")
    for verb in ("start", "state", "pause", "resume"):
        sub.add_parser(verb).add_argument("id")
    k = sub.add_parser("kill")
    k.add_argument("-a", "--all", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    d = sub.add_parser("delete")
    d.add_argument("-f", "--force", action="store_true")
    d.add_argument("id")
    e = sub.add_parser("exec")
    e.add_argument("--console-socket")
    e.add_argument("--cwd")
    e.add_argument("-e", "--env", action="append", default=[])
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("-u", "--user")
    e.add_argument("--additional-gids", action="append", type=int, default=[])
    e.add_argument("-p", "--process")
    e.add_argument("-d", "--detach", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("--process-label")
    e.add_argument("--apparmor")
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("-c", "--cap", action="append", default=[])
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("--ignore-paused", action="store_true")
    e.add_argument("id")
    e.add_argument("command", nargs=argparse.REMAINDER)
    ps = sub.add_parser("ps")
    ps.add_argument("-f", "--format", choices=["table", "json"], default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    ls = sub.add_parser("list")
    ls.add_argument("-f", "--format", choices=["table", "json"], default="table")
    ls.add_argument("-q", "--quiet", action="store_true")
    u = sub.add_parser("update")
    u.add_argument("-r", "--resources")
    u.add_argument("--memory")
    u.add_argument("--cpu-quota", type=int)
    u.add_argument("--cpu-period", type=int)
    u.add_argument("--cpu-shares", type=int)
    u.add_argument("--pids-limit", type=int)
    u.add_argument("--cpuset-cpus")
    u.add_argument("id")
    ev = sub.add_parser("events")
    ev.add_argument("--stats", action="store_true")
    ev.add_argument("--interval", default="5s")
    ev.add_argument("id")
    s = sub.add_parser("spec")
    s.add_argument("-b", "--bundle", default=".")
    s.add_argument("--rootless", action="store_true")
    sub.add_parser("features")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = _Log(args.log, args.log_format, args.debug)
    if args.version:
        print(f"isobox-runtime version {__version__}\nspec: 1.2.0")
        return 0
    if not args.verb:
        _parser().print_help()
        return 2
    try:
        if args.systemd_cgroup:
            raise InvalidArgument(
                "--systemd-cgroup is not supported: isobox manages cgroups through cgroupfs "
                "(configure the caller with cgroup_manager = \"cgroupfs\")"
            )
        log.debug(f"{args.verb} {getattr(args, 'id', '')}")
        return int(_VERBS[args.verb](args))
    except IsoboxError as exc:
        msg = str(exc)
        log.write("error", msg)
        print(f"isobox-runtime: {msg}", file=sys.stderr)
        return 1
    except OSError as exc:
        msg = f"{args.verb}: {exc}"
        log.write("error", msg)
        print(f"isobox-runtime: {msg}", file=sys.stderr)
        return 1


def _root(args: argparse.Namespace) -> Path:
    """The state root; an existing one must be the runtime's own and writable by it only
    (anyone else could plant or replace containers' state there)."""
    root = Path(args.root)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return root
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"--root {root} is not a directory")
    if st.st_uid != os.geteuid():
        raise InvalidArgument(f"--root {root} is owned by uid {st.st_uid}, not by the "
                              f"runtime's user ({os.geteuid()}): refusing to use it")
    if st.st_mode & 0o022:
        raise InvalidArgument(f"--root {root} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o}): refusing to use it")
    return root


def _load(args: argparse.Namespace) -> Any:
    from isobox.silo.container import Container

    return Container.load(_root(args), args.id)


def _silo_config(bundle: Path) -> Any:
    from isobox.silo.config import from_oci
    from isobox.spec.runtime import load_config

    return from_oci(load_config(bundle / "config.json"), bundle.absolute())


def cmd_create(args: argparse.Namespace) -> int:
    from isobox.silo.container import Container

    bundle = Path(args.bundle)
    Container.create(
        _root(args), args.id, bundle, _silo_config(bundle),
        console_socket=args.console_socket, preserve_fds=args.preserve_fds,
        pid_file=Path(args.pid_file) if args.pid_file else None,
    )
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    _load(args).start()
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    print(json.dumps(_load(args).oci_state(), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from isobox.silo.container import parse_signal

    _load(args).kill(parse_signal(args.signal), all_processes=args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from isobox.errors import NotFound

    try:
        c = _load(args)
    except NotFound:
        if args.force:
            return 0  # runc: deleting a missing container with --force succeeds
        raise
    c.delete(force=args.force)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from isobox._sys import linux as L
    from isobox.silo.container import Container

    bundle = Path(args.bundle)
    if not args.detach:
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)  # the init becomes our child when stage 1 exits
    c = Container.create(
        _root(args), args.id, bundle, _silo_config(bundle),
        console_socket=args.console_socket, preserve_fds=args.preserve_fds,
        pid_file=Path(args.pid_file) if args.pid_file else None,
    )
    try:
        c.start()
        if args.detach:
            return 0
        status = _wait_for(c.state.pid)
    except BaseException:
        # As runc: a run that fails to start leaves nothing (init, cgroup, state).
        import contextlib

        with contextlib.suppress(Exception):
            c.delete(force=True)
        raise
    if not args.keep:
        c.delete(force=True)
    return status


def _wait_for(pid: int) -> int:
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 255
        if got == pid:
            if os.WIFEXITED(status):
                return os.WEXITSTATUS(status)
            return 128 + os.WTERMSIG(status)


def cmd_exec(args: argparse.Namespace) -> int:
    import socket

    from isobox.silo.config import Process, cap_masks
    from isobox.silo.execin import exec_in

    c = _load(args)
    status = c.status()
    if str(status) not in ("running",) and not (str(status) == "paused" and args.ignore_paused):
        raise InvalidArgument(f"cannot exec in a {status} container")
    base = c.base_process()
    if args.process:
        from isobox.spec.runtime import load_process

        spec_proc = load_process(Path(args.process))
        proc = _process_from_spec(spec_proc, base)
    else:
        if not args.command:
            raise InvalidArgument("exec: give a command or --process")
        proc = Process(**{**base.__dict__})
        proc.args = list(args.command)
        proc.terminal = args.tty
    if args.env:
        proc.env = [*proc.env, *args.env]
    if args.cwd:
        proc.cwd = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        proc.uid, proc.gid = int(uid), int(gid or 0)
    if args.additional_gids:
        proc.additional_gids = args.additional_gids
    if args.cap:
        extra = cap_masks({"bounding": args.cap, "effective": args.cap,
                           "permitted": args.cap})
        proc.bounding |= extra["bounding"]
        proc.effective |= extra["effective"]
        proc.permitted |= extra["permitted"]
    if args.no_new_privs:
        proc.no_new_privileges = True
    console = None
    if args.console_socket:
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(args.console_socket)

    def write_pid(pid: int) -> None:
        if args.pid_file:
            tmp = Path(args.pid_file).with_name(f".{Path(args.pid_file).name}.tmp")
            tmp.write_text(str(pid))
            os.replace(tmp, args.pid_file)

    try:
        result = exec_in(c.state.pid, c.cgroup, proc, detach=args.detach,
                         console_socket=console, preserve_fds=args.preserve_fds,
                         on_pid=write_pid, user_ns=c.state.user_ns)
    finally:
        if console is not None:
            console.close()
    return 0 if args.detach else result


def _process_from_spec(sp: Any, base: Any) -> Any:
    from isobox.silo.config import Process, cap_masks, rlimit_number

    caps = cap_masks(sp.capabilities.model_dump(exclude_none=True)) if sp.capabilities else {
        k: getattr(base, k) for k in ("bounding", "effective", "permitted", "inheritable",
                                      "ambient")}
    user = sp.user
    return Process(
        args=list(sp.args or []), env=list(sp.env or []), cwd=sp.cwd or "/",
        uid=user.uid if user else 0, gid=user.gid if user else 0,
        additional_gids=list(user.additional_gids or []) if user else [],
        umask=user.umask if user else None, terminal=bool(sp.terminal),
        rlimits=[(rlimit_number(r.type), r.soft, r.hard) for r in sp.rlimits or []],
        no_new_privileges=bool(sp.no_new_privileges), oom_score_adj=sp.oom_score_adj,
        seccomp=base.seccomp,
        bounding=caps["bounding"], effective=caps["effective"], permitted=caps["permitted"],
        inheritable=caps["inheritable"], ambient=caps["ambient"],
    )


def cmd_pause(args: argparse.Namespace) -> int:
    _load(args).pause()
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _load(args).resume()
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    pids = _load(args).pids()
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    print(f"{'PID':>8}  CMD")
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        print(f"{pid:>8}  {cmd}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from isobox.silo.container import Container

    items = [
        {**c.oci_state(), "created": c.state.created, "owner": "root"}
        for c in Container.all(_root(args))
    ]
    if args.quiet:
        for it in items:
            print(it["id"])
    elif args.format == "json":
        print(json.dumps(items))
    else:
        print(f"{'ID':<24} {'PID':>8}  {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for it in items:
            print(f"{it['id']:<24} {it['pid']:>8}  {it['status']:<10} {it['bundle']:<40} "
                  f"{it['created']}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from isobox.jobs.limits import Limits, parse_size

    c = _load(args)
    limits = Limits()
    if args.resources:
        from isobox.silo.config import limits_from_oci
        from isobox.spec.runtime import load_resources

        src = sys.stdin.read() if args.resources == "-" else Path(args.resources).read_text()
        limits = limits_from_oci(load_resources(src))
    ncpu = os.cpu_count() or 1
    quota = args.cpu_quota
    cpu_rate = None
    if quota and quota > 0:
        cpu_rate = max(1, min(10000, round(quota / (args.cpu_period or 100_000) / ncpu * 10000)))
    limits = limits.merge(Limits(
        memory=parse_size(args.memory) if args.memory else None,
        cpu_rate=cpu_rate,
        cpu_weight=max(1, min(10000, args.cpu_shares * 100 // 1024)) if args.cpu_shares else None,
        pids=args.pids_limit, cpuset=args.cpuset_cpus,
    ))
    c.cgroup.set_limits(limits.validate(), ncpu)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    c = _load(args)
    counters = c.cgroup.read()
    stats = {
        "type": "stats", "id": c.state.id,
        "data": {
            "cpu": {"usage": {"total": counters.cpu_user_ns + counters.cpu_kernel_ns,
                              "user": counters.cpu_user_ns, "kernel": counters.cpu_kernel_ns},
                    "throttling": {"throttledPeriods": counters.throttled_periods}},
            "memory": {"usage": {"usage": counters.memory_current,
                                 "max": counters.memory_peak,
                                 "failcnt": counters.memory_limit_hits}},
            "pids": {"current": len(c.pids())},
            "blkio": {"ioServiceBytesRecursive": [
                {"op": "Read", "value": counters.io_read_bytes},
                {"op": "Write", "value": counters.io_write_bytes}]},
        },
    }
    print(json.dumps(stats))
    if not args.stats:
        while c.status() != "stopped":
            time.sleep(1)
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from isobox.spec.runtime import default_config, dump_config

    target = Path(args.bundle) / "config.json"
    if target.exists():
        raise InvalidArgument(f"{target} exists already")
    target.write_bytes(dump_config(default_config(["sh"])))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from isobox._sys.linux import CAPABILITIES

    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
                  "poststart", "poststop"],
        "mountOptions": ["ro", "rw", "nosuid", "nodev", "noexec", "bind", "rbind",
                         "private", "rprivate", "shared", "rshared", "slave", "rslave"],
        "linux": {"namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user",
                                 "uts"],
                  "capabilities": CAPABILITIES,
                  "cgroup": {"v1": True, "v2": True, "systemd": False},
                  "seccomp": {"enabled": True}},
    }, indent=2))
    return 0


_VERBS = {
    "create": cmd_create, "start": cmd_start, "state": cmd_state, "kill": cmd_kill,
    "delete": cmd_delete, "run": cmd_run, "exec": cmd_exec, "pause": cmd_pause,
    "resume": cmd_resume, "ps": cmd_ps, "list": cmd_list, "update": cmd_update,
    "events": cmd_events, "spec": cmd_spec, "features": cmd_features,
}


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
