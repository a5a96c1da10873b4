"""Hardening of isobox.jobs against the review's findings: escapes, races, leaks, units, CLI."""

# Every test is bounded in time (pytest-timeout) and in processes (a pids limit, or a fixed
# number of short-lived children that the test kills itself). Hostile code only ever runs
# inside a job with limits, or is a bounded loop.

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _jobs_backend import cfs_quota_period, cg_file, hierarchy_dirs, in_job, machine_backend
from isobox.errors import InvalidArgument, IsoboxError
from isobox.jobs import Job, Limits
from isobox.jobs.cgroup import V1_CONTROLLERS as V1_CTRLS  # every hierarchy a job uses

PY = [sys.executable, "-S", "-c"]
HOG_MEM = "b = []\nwhile True:\n    b.append(bytearray(1 << 20))\n"

v1 = pytest.mark.cgroup1  # only for what is v1's own (its hierarchies, its semantics)


@pytest.fixture
def on_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOBOX_CGROUP_VERSION", "1")


@pytest.fixture
def on_any(monkeypatch: pytest.MonkeyPatch) -> int:
    """The machine's cgroup backend (1 or 2) for the test's jobs; see _jobs_backend."""
    return machine_backend(monkeypatch)


def isobox(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isobox.cli.main", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
        **kw,  # type: ignore[call-overload]
    )


def _kill(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _rmtree_cgroup(dirs: list[str]) -> None:
    """Test clean-up: remove leftover cgroup dirs (deepest first), killing what is in them."""
    for top in dirs:  # thaw and kill everything first, in every hierarchy
        for dirpath, _d, _f in os.walk(top):
            with contextlib.suppress(OSError), \
                    open(os.path.join(dirpath, "freezer.state"), "w") as fh:
                fh.write("THAWED")
            with contextlib.suppress(OSError):
                _kill(*(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()))
    for top in dirs:
        if not os.path.isdir(top):
            continue
        for dirpath, _d, _f in sorted(os.walk(top), key=lambda w: -len(w[0])):
            for _ in range(200):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _run_owner(code: str) -> str:
    """Run an owner that SIGKILLs itself; its stdout goes to a file (its job's processes
    inherit it, so a pipe would never reach EOF while they live)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=out,
                                 stderr=subprocess.DEVNULL)
        owner.wait(timeout=30)
        out.seek(0)
        return out.read()


@contextlib.contextmanager
def closing(job: Job) -> Iterator[Job]:
    try:
        yield job
    finally:
        with contextlib.suppress(Exception):
            for child in list(job.children):
                with contextlib.suppress(Exception):
                    child.thaw()
            job.thaw()
        with contextlib.suppress(Exception):
            job.close()
        _rmtree_cgroup(job.cgroup.dirs())


# ---- 1. a root process leaves its job: kill-on-close and every limit stop holding -----------
#
# The review's test demanded that *any* process cannot migrate out. For a host job that is not
# a guarantee isobox can give (on v1 euid 0 alone may write any cgroup.procs; see the Job
# docstring), so the test is split along what is documented: a confined process cannot leave
# (by any of the routes below), and an unconfined one that leaves every hierarchy is outside
# the job -- but close() still completes and leaves nothing behind.

# Every cgroup.procs it can name: v1's per hierarchy, v2's root and its children.
ESCAPE = ("for f in /sys/fs/cgroup/cgroup.procs /sys/fs/cgroup/*/cgroup.procs "
          "/proc/1/root/sys/fs/cgroup/cgroup.procs /proc/1/root/sys/fs/cgroup/*/cgroup.procs; do "
          "[ -e $f ] && echo $$ > $f; done 2>/dev/null; exec sleep 30")
# Confined only: unconfined, these would succeed in the host's mount namespace.
ESCAPE_BY_MOUNT = (
    "mount -o remount,rw /sys/fs/cgroup/pids 2>/dev/null && echo $$ > "
    "/sys/fs/cgroup/pids/cgroup.procs; "
    "d=$(mktemp -d) && mount -t cgroup -o pids none $d 2>/dev/null && "
    "echo $$ > $d/cgroup.procs; umount $d 2>/dev/null; "
    "mount -o remount,rw /sys/fs/cgroup 2>/dev/null && echo $$ > /sys/fs/cgroup/cgroup.procs; "
    "mount -t cgroup2 none $d 2>/dev/null && echo $$ > $d/cgroup.procs; umount $d 2>/dev/null; "
    "rmdir $d; "
)


@pytest.mark.timeout(60)
def test_a_confined_process_cannot_migrate_out_of_its_job(on_any: int) -> None:
    """spawn(confine=True): writes to every cgroup.procs it can name (directly, through
    /proc/1/root, after a remount, through a fresh cgroupfs mount) all fail; the process
    stays in every hierarchy of the job and dies with kill-on-close."""
    job = Job(limits=Limits(pids=5, memory=64 << 20))
    proc = job.spawn(["sh", "-c", ESCAPE_BY_MOUNT + ESCAPE], confine=True)
    try:
        time.sleep(1.0)
        cgroups = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        inside, outside = in_job(cgroups, job)
        assert inside and not outside, f"left the job in: {outside}"
        job.close()
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        _rmtree_cgroup(job.cgroup.dirs())


@pytest.mark.timeout(60)
def test_confined_commands_run_normally(on_any: int) -> None:
    with closing(Job()) as job:
        out = job.spawn(["sh", "-c", "grep CapBnd /proc/self/status; echo ok"], confine=True,
                        stdout=subprocess.PIPE).communicate(timeout=20)[0].decode()
        bounding = int(out.split()[1], 16)
        assert out.split()[-1] == "ok"
        assert not bounding & (1 << 21 | 1 << 19 | 1 << 16)  # SYS_ADMIN, SYS_PTRACE, MODULE
        assert job.spawn(["no-such-command-x"], confine=True,
                         stderr=subprocess.DEVNULL).wait(timeout=20) == 127


@pytest.mark.timeout(60)
def test_an_unconfined_root_process_can_leave_but_close_completes(on_any: int) -> None:
    """The documented limit of a host job: an unconfined root process that moves itself out
    of every hierarchy is no longer in the job. close() does not hang or fail on it, and
    removes every cgroup folder."""
    job = Job(limits=Limits(pids=5, memory=64 << 20))
    proc = job.spawn(["sh", "-c", ESCAPE])
    try:
        time.sleep(0.5)
        job.close()
        assert not any(os.path.exists(d) for d in job.cgroup.dirs())
        assert proc.poll() is None, "an unconfined root process can leave: documented"
    finally:
        proc.kill()
        proc.wait()
        _rmtree_cgroup(job.cgroup.dirs())


@v1
@pytest.mark.timeout(60)
def test_close_survives_a_process_that_left_only_the_pids_hierarchy(on_v1: None) -> None:
    """kill_all/_wait_empty only look at the pids hierarchy: a process that left just that
    one is never killed, rmdir of the other hierarchies fails EBUSY and close() raises after
    5 s, leaving every cgroup dir and the process behind."""
    job = Job()
    proc = job.spawn(["sh", "-c", "echo $$ > /sys/fs/cgroup/pids/cgroup.procs; exec sleep 30"])
    try:
        time.sleep(0.3)
        job.close()
        assert proc.poll() is not None or proc.wait(timeout=2) is not None
    finally:
        proc.kill()
        proc.wait()
        _rmtree_cgroup(job.cgroup.dirs())
        with contextlib.suppress(Exception):
            job.close()


# ---- 2. terminate / kill-on-close vs. a frozen nested job --------------------------------------


@pytest.mark.timeout(60)
def test_terminate_kills_a_frozen_nested_job(on_any: int) -> None:
    """v1 kill_all freezes, SIGKILLs and thaws the *parent*; thawing the parent does not thaw a
    child that was frozen itself, so its processes never die: terminate() spins 10 s and
    raises CgroupError."""
    with closing(Job()) as job:
        child = Job("inner", parent=job)
        proc = child.spawn(["sleep", "30"])
        time.sleep(0.2)
        child.freeze()
        try:
            job.terminate()
        except IsoboxError as exc:
            pytest.fail(f"terminate() with a frozen child job: {exc}")
        assert proc.wait(timeout=2) == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_reaper_cleans_up_a_frozen_nested_job_after_the_owner_is_killed(on_any: int) -> None:
    """Same cause, worse outcome: the owner is SIGKILLed while a nested job is frozen; the
    reaper's kill_all fails (suppressed), rmdir gives up, and the frozen process and every
    cgroup dir stay forever."""
    code = (
        "import json, os, time\n"
        "from isobox.jobs import Job\n"
        "job = Job()\n"
        "child = Job('inner', parent=job)\n"
        "p = child.spawn(['sleep', '300'])\n"
        "time.sleep(0.2)\n"
        "child.freeze()\n"
        "print(json.dumps([job.cgroup.dirs(), p.pid]), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    dirs, sleeper = json.loads(_run_owner(code))
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            if not any(os.path.exists(d) for d in dirs):
                break
            time.sleep(0.2)
        left = [d for d in dirs if os.path.exists(d)]
        assert not left, f"left behind after the reaper ran: {left} (sleep {sleeper} frozen)"
    finally:
        _rmtree_cgroup(dirs)
        _kill(sleeper)


# ---- 3. kill_on_close=False: no reaper at all --------------------------------------------------


@pytest.mark.timeout(60)
def test_no_cgroup_left_when_owner_of_a_non_kill_on_close_job_is_killed(on_any: int) -> None:
    """The reaper is only started with kill_on_close (job.py:83), although reaper.py has the
    'wait for the job to empty, then remove' branch for exactly this case."""
    code = (
        "import json, os\n"
        "from isobox.jobs import Job\n"
        "job = Job(kill_on_close=False)\n"
        "job.spawn(['sleep', '0.5'])\n"
        "print(json.dumps(job.cgroup.dirs()), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    dirs = json.loads(_run_owner(code))
    try:
        # The sleeper is gone after 0.5 s; the reaper (a Python process of its own, which
        # may still be importing when the owner dies: seconds on a slow, emulated CPU)
        # then removes the cgroups.
        deadline = time.monotonic() + 20
        while any(os.path.exists(d) for d in dirs) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [d for d in dirs if os.path.exists(d)]
        assert not left, f"left behind: {left}"
    finally:
        _rmtree_cgroup(dirs)


# ---- 4. monitor thread dies on a close()/event race; events then stop for good ---------------


@v1
@pytest.mark.timeout(90)
def test_monitor_survives_a_nested_job_closing_while_its_oom_eventfd_fires(on_v1: None) -> None:
    """_Monitor._run selects without the lock, then handles the ready list under it. If a
    child job is closed in between (unwatch + cgroup.remove closes the eventfd),
    os.eventfd_read(key.fd) hits a closed fd (or a reused one: it would read 8 bytes from an
    unrelated descriptor) and self._efd[key.fd] raises KeyError. The thread dies with a
    traceback on stderr and no event is delivered again. The select wrapper below only makes
    the preemption point deterministic."""
    with closing(Job(limits=Limits(pids=20))) as job:
        child = Job("inner", parent=job, limits=Limits(memory=32 << 20))
        mon = job._monitor
        efd = next(fd for fd, j in mon._efd.items() if j is child)
        ready, go = threading.Event(), threading.Event()
        real_select = mon._sel.select

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            r = real_select(timeout)
            if not ready.is_set() and any(k.fd == efd for k, _ in r):
                ready.set()
                go.wait(5)  # the monitor thread is preempted here
            return r

        mon._sel.select = select  # type: ignore[method-assign]
        child.spawn([*PY, HOG_MEM])
        assert ready.wait(30), "the child's OOM eventfd never fired"
        child.close()
        go.set()
        time.sleep(0.5)
        assert mon._thread.is_alive(), "the monitor thread died"


# ---- 5. accounting: pid reuse, CLONE_PARENT, moves between nested jobs ------------------------


@pytest.mark.timeout(60)
def test_pid_reuse_before_the_exit_event_is_handled_loses_counts(on_any: int) -> None:
    """track() skips a pid that is still in members (a stale entry whose Exit is queued), and
    the queued Exit then pops the *new* process: it, its children and its exit are never
    counted. pid_max is 32768 here, so reuse is ordinary; the test forces it with
    ns_last_pid and holds the monitor lock to stand for a monitor that is a little behind
    (a busy host, or a slow on_event callback, which runs under that lock)."""
    with closing(Job()) as job:
        ran = 0
        with job._monitor._lock:
            first = job.spawn(["/bin/true"])
            first.wait()
            ran += 1
            for _ in range(20):
                Path("/proc/sys/kernel/ns_last_pid").write_text(str(first.pid - 1))
                # sh and two /bin/true with any shell (busybox ash execs a last command)
                second = job.spawn(["sh", "-c", "/bin/true; /bin/true; :"])
                ran += 3
                if second.pid == first.pid:
                    break
                second.wait()
            else:
                pytest.skip("could not get the pid reused")
        second.wait()
        acct = job.accounting()
        assert (acct.total_processes, acct.terminated_processes) == (ran, ran)


@pytest.mark.timeout(60)
def test_clone_parent_children_are_counted(on_any: int) -> None:
    """Fork events are attributed by the *real parent*'s tgid. clone(CLONE_PARENT) from the
    job's top process makes the owner (outside the job) the real parent, so those children
    run in the job's cgroup but are in neither total_processes nor terminated_processes --
    and they become zombies of the owner, which never reaps them."""
    code = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for _ in range(3):\n"
        "    if libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0) == 0:\n"  # clone(CLONE_PARENT|SIGCHLD)
        "        os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    if os.uname().machine != "x86_64":
        pytest.skip("raw clone syscall number is x86_64's")
    with closing(Job()) as job:
        proc = job.spawn([*PY, code])
        assert proc.wait(timeout=10) == 0
        acct = job.accounting()
        zombies: list[int] = []
        with contextlib.suppress(ChildProcessError):
            while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
                zombies.append(pid)
        assert acct.total_processes == 4, f"counted {acct.total_processes} of 4 processes"
        assert not zombies, f"zombies of the owner: {zombies}"


@pytest.mark.timeout(60)
def test_moving_a_process_between_nested_jobs_does_not_double_count(on_any: int) -> None:
    with closing(Job()) as parent:
        child = Job("inner", parent=parent)
        proc = child.spawn(["sleep", "30"])
        parent.assign(proc.pid)
        assert parent.accounting().total_processes == 1


# ---- 6. assign() of a running process on v1 is not atomic across hierarchies -----------------


@v1
@pytest.mark.timeout(120)
def test_assign_places_children_forked_during_the_move_in_every_hierarchy(on_v1: None) -> None:
    """CgroupV1.add writes the pid to cpu, cpuacct, cpuset, memory, pids, blkio, freezer in
    turn; a child forked between the writes lands in some of the job's hierarchies only --
    outside its pids/memory/freezer limits and invisible to pids()/kill_all."""
    mixed: list[tuple[str, list[str]]] = []
    for _ in range(10):
        job = Job()
        forker = subprocess.Popen(["sh", "-c", "for i in $(seq 200); do sleep 2 & done; wait"])
        try:
            time.sleep(0.05)
            job.assign(forker.pid)
            time.sleep(0.3)
            name = job.name
            kids = subprocess.run(["pgrep", "-P", str(forker.pid)], capture_output=True,
                                  text=True, check=False).stdout.split()
            for k in kids:
                try:
                    lines = Path(f"/proc/{k}/cgroup").read_text().splitlines()
                except FileNotFoundError:
                    continue
                lines = [ln for ln in lines if ln.split(":")[1] in V1_CTRLS]
                inside = [name in ln for ln in lines]
                if any(inside) and not all(inside):
                    mixed.append((k, lines))
            for k in kids:
                _kill(int(k))
        finally:
            forker.kill()
            forker.wait()
            with contextlib.suppress(Exception):
                job.close()
            _rmtree_cgroup(job.cgroup.dirs())
        if mixed:
            break
    assert not mixed, f"half-placed children: {mixed[:2]}"


# ---- 7. live updates of a parent with nested jobs fail on v1 ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("before", "after"), [
    (Limits(cpu_rate=5000), Limits(cpu_rate=1000)),
    (Limits(cpuset="0-1"), Limits(cpuset="0")),
    (Limits(cpu_rate=1000), Limits(cpu_rate=5000)),  # loosening: the parent goes first
    (Limits(cpu_rate=1000), Limits(cpu_rate=5)),  # a longer period on the way down
    (Limits(cpuset="0"), Limits(cpuset="1")),  # neither a subset: through the union
])
def test_tightening_a_parent_with_a_nested_job(on_any: int, before: Limits,
                                               after: Limits) -> None:
    """update() writes the parent first, then re-clamps children. v1 refuses a parent
    cfs_quota below a child's (EINVAL) and a parent cpuset that drops a child's CPUs
    (EBUSY), and the child inherited exactly the old parent values."""
    if after.cpuset and (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs")
    with closing(Job(limits=before)) as job:
        child = Job("inner", parent=job)
        job.update(after)
        assert child.effective.cpu_rate == after.cpu_rate or after.cpu_rate is None
        if after.cpuset:
            cpus = cg_file(child, ("cpuset", "cpuset.cpus"), "cpuset.cpus").read_text()
            assert cpus.strip() == after.cpuset
            assert child.effective.cpuset == after.cpuset == job.effective.cpuset


@v1
@pytest.mark.timeout(60)
def test_a_failed_update_leaves_effective_as_written(on_v1: None) -> None:
    """memory below what the job uses cannot be set (EBUSY); the cpu change before it in
    the same update was written, and effective says so."""
    with closing(Job(limits=Limits(cpu_rate=5000, memory=256 << 20))) as job:
        proc = job.spawn([*PY, "b = bytearray(48 << 20)\nimport time\ntime.sleep(30)"])
        mem_dir = next(d for d in job.cgroup.dirs() if "/memory/" in d)
        deadline = time.monotonic() + 10
        while int(Path(mem_dir, "memory.usage_in_bytes").read_text()) < 40 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(IsoboxError):
            job.update(Limits(cpu_rate=2000, memory=1 << 20))
        assert job.effective.cpu_rate == 2000
        assert job.effective.memory == int(Path(mem_dir, "memory.limit_in_bytes").read_text())
        proc.kill()


# ---- 8. 'pids' was documented as ActiveProcessLimit but counts threads ------------------------
#
# The review's test expected processes only. The kernel's pids controller counts tasks, and
# isobox now documents ``pids`` as a task limit (limits.py, README): the test checks that.


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("threads", "ok"), [(3, True), (8, False)])
def test_pids_limit_counts_tasks_threads_included(on_any: int, threads: int, ok: bool) -> None:
    code = ("import threading, time\n"
            f"ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range({threads})]\n"
            "[t.start() for t in ts]\n[t.join() for t in ts]\n")
    with closing(Job(limits=Limits(pids=5))) as job:
        proc = job.spawn([*PY, code], stderr=subprocess.DEVNULL)
        assert (proc.wait(timeout=20) == 0) is ok, f"1 + {threads} tasks under pids=5"
        assert (job.wait_event("process_limit", 2.0) is None) is ok


# ---- 9. job names: check-then-create race -------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_jobs_cannot_share_one_name(on_any: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job.__init__ checks exists() and then create() swallows FileExistsError for the job's
    own dir, so two owners racing on one name both succeed and share one cgroup (the first
    close kills the other's processes). The delay only widens the window."""
    from isobox.jobs.cgroup import Cgroup, CgroupV1, CgroupV2

    backend = CgroupV1 if on_any == 1 else CgroupV2
    real_create = backend.create

    def slow_create(self: Cgroup) -> None:
        time.sleep(0.3)
        real_create(self)

    monkeypatch.setattr(backend, "create", slow_create)
    name = f"review-same-{os.getpid()}"
    made: list[Job] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            made.append(Job(name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(made) == 1, f"{len(made)} Job objects own cgroup {name!r}: {errors}"
    finally:
        for j in made:
            with contextlib.suppress(Exception):
                j.close()
        if made:
            _rmtree_cgroup(made[0].cgroup.dirs())


# ---- 10. fds and a thread left when Job() fails after its monitor started ---------------------


@pytest.mark.timeout(60)
def test_failed_job_creation_leaves_no_thread_or_fds(on_any: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """If _start_reaper (Popen: EAGAIN under a pids limit on the engine, EMFILE) or
    _Monitor.watch fails, __init__ removes the cgroup but never stops the monitor: its
    thread, netlink socket (receiving every fork/exit of the host), inotify fd and wake pipe
    live on."""
    import isobox.jobs.job as jobmod

    def no_reaper(_job: Job) -> subprocess.Popen[bytes]:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(jobmod, "_start_reaper", no_reaper)
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = {t.name for t in threading.enumerate()}
    with pytest.raises(OSError):
        Job()
    time.sleep(0.2)
    extra_threads = {t.name for t in threading.enumerate()} - threads_before
    extra_fds = set(os.listdir("/proc/self/fd")) - fds_before
    assert not extra_threads and not extra_fds, (extra_threads, extra_fds)


# ---- 11. things left in the cgroup filesystem -------------------------------------------------


@pytest.mark.timeout(60)
def test_no_parent_dirs_left_after_the_last_job(on_any: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """create() makes the missing parents (<engine's cgroup>/isobox or
    $ISOBOX_CGROUP_PARENT) but nothing ever removes them. In the default layout the memory
    one sits in the engine's own cgroup (/process_api/<id>/isobox here), so the host can no
    longer rmdir the engine's cgroup when the engine is gone (EBUSY: it has a child)."""
    top = f"isobox-review-{os.getpid()}"
    monkeypatch.setenv("ISOBOX_CGROUP_PARENT", f"{top}/jobs")
    job = Job()
    job.close()
    left = hierarchy_dirs(top)
    _rmtree_cgroup(left)
    assert not left, f"left behind: {left}"


# ---- 12. units ----------------------------------------------------------------------------------


def test_cfs_period_keeps_small_rates_exact() -> None:
    from isobox.jobs.cgroup import cfs_quota_period, enforced_cpu_rate

    assert cfs_quota_period(1000, 2) == (20000, 100000)
    assert cfs_quota_period(10, 1) == (1000, 1000000)
    assert cfs_quota_period(10, 2) == (1000, 500000)
    for ncpu in (1, 2, 3, 64):
        for rate in (10 // ncpu or 1, 10, 11, 37, 100, 9999, 10000):
            quota, period = cfs_quota_period(rate, ncpu)
            assert quota >= 1000 and 1000 <= period <= 1_000_000
            real = quota / period / ncpu * 10000
            if rate * ncpu >= 10:
                assert abs(real - rate) / rate < 0.001, (rate, ncpu, real)
                assert enforced_cpu_rate(rate, ncpu) == rate
            else:
                assert enforced_cpu_rate(rate, ncpu) >= real


@pytest.mark.timeout(60)
def test_an_impossible_cpu_rate_is_clamped_and_said_so(on_any: int) -> None:
    """cpu_rate=1 (0.01% of the machine) is below 1 ms per 1 s on this host: the nearest
    enforceable rate is used and listed in clamped."""
    with closing(Job(limits=Limits(cpu_rate=1))) as job:
        if job.ncpu >= 10:
            pytest.skip("1/10000 of 10+ CPUs is enforceable")
        assert cfs_quota_period(job) == (1000, 1_000_000)
        assert "cpu_rate" in job.effective.clamped
        assert job.effective.cpu_rate == -(-10 // job.ncpu)


@pytest.mark.timeout(60)
def test_small_cpu_rate_is_not_silently_loosened(on_any: int) -> None:
    """cpu_rate=10 (0.1% of the machine) is written as max(1000, 200) us per 100 ms period:
    1% of a CPU, several times the requested cap, and not reported in `clamped`. A longer
    period (up to 1 s) keeps the ratio exact down to the 1 ms minimum quota."""
    with closing(Job(limits=Limits(cpu_rate=10))) as job:
        quota, period = cfs_quota_period(job)
        rate = quota / period / job.ncpu * 10000
        assert rate <= 10 * 1.1 or "cpu_rate" in job.effective.clamped, (
            f"cpu_rate 10 enforced as {rate:.0f}")


# ---- 13. the CLI: tracebacks, Ctrl-C --------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ["--cpus", "nan"],
    ["--cpus", "inf"],
    ["--io-read-bps", "/etc/passwd/x:1m"],
    ["--cpuset", "0-99999"],
])
def test_cli_bad_values_give_one_line_not_a_traceback(on_any: int, args: list[str]) -> None:
    proc = isobox("job", "run", *args, "--", "true")
    assert "Traceback" not in proc.stderr, proc.stderr[-400:]
    assert proc.returncode == 2


@pytest.mark.timeout(60)
def test_cli_huge_cpuset_range_is_refused_not_expanded() -> None:
    """parse_cpuset materialises every CPU of a range: '0-4000000000' builds a 4e9-int set
    (tens of GB) before anything checks it. Bounded here by RLIMIT_AS = 1 GiB."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = isobox("job", "run", "--cpuset", "0-4000000000", "--", "true", timeout=30,
                  preexec_fn=limit)
    assert "Traceback" not in proc.stderr, proc.stderr[-300:]
    assert proc.returncode == 2


@pytest.mark.timeout(60)
def test_cli_ctrl_c_reaches_the_command_once(on_any: int) -> None:
    """The command shares isobox's process group, so a terminal's Ctrl-C reaches it directly
    *and* isobox's forward() sends it again: the command sees two SIGINTs (many programs
    treat the second one as 'force quit')."""
    child = ("import signal, sys, time\n"
             "n = [0]\n"
             "signal.signal(signal.SIGINT, lambda s, f: n.__setitem__(0, n[0] + 1))\n"
             "print('ready', flush=True)\n"
             "t = time.time()\n"
             "while time.time() - t < 2: time.sleep(0.05)\n"
             "sys.exit(n[0])\n")
    p = subprocess.Popen([sys.executable, "-m", "isobox.cli.main", "job", "run", "--",
                          *PY, child], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        assert p.stdout is not None
        p.stdout.readline()
        time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert p.wait(timeout=20) == 1, "the command saw SIGINT more than once"
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", [b"\x03", b"\x1a"])
def test_cli_at_a_terminal_the_command_has_the_foreground(on_any: int, key: bytes) -> None:
    """On a real terminal (a pty, isobox its session leader): ^C reaches the command once,
    from the kernel; ^Z stops the command and then isobox (as a shell's job control wants),
    and continuing isobox gives the command the terminal back and continues it."""
    import select

    child = ("import signal, sys, time\n"
             "n = [0]\n"
             "signal.signal(signal.SIGINT, lambda s, f: n.__setitem__(0, n[0] + 1))\n"
             "print('ready', flush=True)\n"
             "t = time.time()\n"
             "while time.time() - t < 2: time.sleep(0.05)\n"
             "sys.exit(10 + n[0])\n")
    master, slave = os.openpty()
    p = subprocess.Popen(["setsid", "-c", sys.executable, "-m", "isobox.cli.main", "job", "run",
                          "--", *PY, child], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        seen, deadline = b"", time.monotonic() + 20
        while b"ready" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
        assert b"ready" in seen, seen
        time.sleep(0.2)
        os.write(master, key)
        if key == b"\x1a":
            state, deadline = "", time.monotonic() + 10
            while state != "T" and time.monotonic() < deadline:
                time.sleep(0.05)
                state = Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()[0]
            assert state == "T", "isobox did not stop with its command"
            os.kill(p.pid, signal.SIGCONT)
        # Drain the pty so that the accounting it prints never blocks isobox.
        deadline = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    os.read(master, 4096)
        assert p.wait(timeout=5) == (11 if key == b"\x03" else 10)
    finally:
        p.kill()
        p.wait()
        os.close(master)


# ---- pure: invalid limits are InvalidArgument ------------------------------------------------


def test_cpus_nan_is_invalid_argument() -> None:
    from isobox.jobs.limits import cpu_rate_from_cpus

    with pytest.raises(InvalidArgument):
        cpu_rate_from_cpus(float("nan"), ncpu=2)
    with pytest.raises(InvalidArgument):
        cpu_rate_from_cpus(float("inf"), ncpu=2)


def test_cpuset_numbers_are_bounded_before_expanding() -> None:
    from isobox.jobs.limits import parse_cpuset

    assert parse_cpuset("0-2,5") == {0, 1, 2, 5}
    assert parse_cpuset("8191") == {8191}
    for bad in ("0-8192", "0-4000000000", "-1", "2-1", "1-", "x"):
        with pytest.raises(InvalidArgument):
            parse_cpuset(bad)


def test_exclusive_create_with_co_mounted_controllers(tmp_path: Path) -> None:
    """cpu and cpuacct are co-mounted on most v1 hosts (one folder for both): that folder is
    made once, and only a second owner of the name gets a Conflict."""
    from isobox.errors import Conflict
    from isobox.jobs.cgroup import CgroupV1

    def make() -> CgroupV1:
        job = tmp_path / "cpu,cpuacct" / "isobox" / "j"
        cg = CgroupV1({"cpu": job, "cpuacct": job, "pids": tmp_path / "pids" / "isobox" / "j"},
                      "isobox/j", stop={"cpu": tmp_path / "cpu,cpuacct",
                                        "cpuacct": tmp_path / "cpu,cpuacct",
                                        "pids": tmp_path / "pids"})
        cg.exclusive = True
        return cg

    first = make()
    first.create()
    with pytest.raises(Conflict):
        make().create()
    assert sorted(first.dirs()) == sorted(str(p) for p in first._paths().values())
    assert all(os.path.isdir(d) for d in first.dirs())
    first.remove()
    first.remove_parents()
    assert sorted(os.listdir(tmp_path)) == ["cpu,cpuacct", "pids"]
    assert not os.listdir(tmp_path / "pids") and not os.listdir(tmp_path / "cpu,cpuacct")


# ---- the reviewer's "suspected" items, and the monitor's robustness ---------------------------


def test_v2_nested_memory_events_are_counted_once(tmp_path: Path) -> None:
    """v2 memory.events (and pids.events) count every descendant's events too; a parent job
    reads its own (.local) counters, as the child's events reach it through _emit."""
    from isobox.jobs.cgroup import CgroupV2

    parent, child = tmp_path / "isobox" / "p", tmp_path / "isobox" / "p" / "c"
    for d, hier, local in ((parent, 3, 0), (parent / "procs", 0, 0),
                           (child, 3, 1), (child / "procs", 2, 2)):
        d.mkdir(parents=True)
        (d / "memory.events").write_text(f"low 0\nhigh 0\nmax {hier}\noom 1\noom_kill {hier}\n")
        (d / "memory.events.local").write_text(f"max {local}\noom_kill {local}\n")
        (d / "pids.events").write_text(f"max {hier}\n")
        (d / "pids.events.local").write_text(f"max {local}\n")
    p = CgroupV2("isobox/p", str(tmp_path)).read()
    c = CgroupV2("isobox/p/c", str(tmp_path)).read()
    assert (p.memory_limit_hits, p.oom_kills, p.pids_limit_hits) == (0, 0, 0)
    assert (c.memory_limit_hits, c.oom_kills, c.pids_limit_hits) == (3, 3, 1)
    watched = CgroupV2("isobox/p/c", str(tmp_path)).watches().files
    assert str(child / "memory.events.local") in watched
    assert str(child / "procs" / "memory.events.local") in watched


@pytest.mark.timeout(60)
def test_close_from_an_event_callback(on_any: int) -> None:
    """close() in an on_event callback runs on the monitor thread: it must not join that
    thread from itself; the thread ends and closes its descriptors after the callback."""
    done = threading.Event()
    errors: list[BaseException] = []

    def on_event(_ev: object) -> None:
        if job.closed:
            return
        try:
            job.close()
        except BaseException as exc:
            errors.append(exc)
        done.set()

    job = Job(limits=Limits(memory=32 << 20), on_event=on_event)
    try:
        proc = job.spawn([*PY, HOG_MEM])
        assert done.wait(30), "no event"
        assert not errors, errors
        assert job.closed and proc.wait(timeout=5) == -signal.SIGKILL
        job._monitor._thread.join(5)
        assert not job._monitor._thread.is_alive()
        assert not any(os.path.exists(d) for d in job.cgroup.dirs())
    finally:
        _rmtree_cgroup(job.cgroup.dirs())


@pytest.mark.timeout(60)
def test_a_failing_callback_does_not_stop_the_monitor(on_any: int) -> None:
    def on_event(_ev: object) -> None:
        raise RuntimeError("a bug in the caller's callback")

    with closing(Job(limits=Limits(pids=3), on_event=on_event)) as job:
        job.spawn(["sh", "-c", "sleep 1 & sleep 1 & sleep 1 & sleep 1 & wait"],
                  stderr=subprocess.DEVNULL)
        assert job.wait_event("process_limit", 5.0) is not None
        time.sleep(0.2)
        assert job._monitor._thread.is_alive()


@pytest.mark.timeout(60)
def test_lost_process_events_are_reconciled(on_any: int) -> None:
    """After ENOBUFS (events dropped), members no longer in the job count as ended and
    processes in the job that were never seen are counted."""
    with closing(Job()) as job:
        proc = job.spawn(["sleep", "30"])
        mon = job._monitor
        with mon._lock:
            del mon.members[proc.pid]  # its fork event was "lost": never counted
            job.total_processes -= 1
            mon.members[(1 << 22) + 1] = job  # counted, but its exit event was "lost"
            job.total_processes += 1
            mon._procs.lost += 1
        acct = job.accounting()
        assert acct.total_processes == 2 and acct.terminated_processes == 1
        assert mon.members.get(proc.pid) is job


@pytest.mark.timeout(120)
def test_parents_come_and_go_under_concurrent_jobs(on_any: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One job's close removes the shared (empty) parent while another job creates its own
    below it: create() retries, nobody fails, nothing is left."""
    top = f"isobox-race-{os.getpid()}"
    monkeypatch.setenv("ISOBOX_CGROUP_PARENT", f"{top}/jobs")
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(6):
                Job().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = hierarchy_dirs(top)
    _rmtree_cgroup(left)
    assert not errors, errors
    assert not left, f"left behind: {left}"


@pytest.mark.timeout(60)
def test_kill_on_close_false_reaper_waits_for_the_job_to_empty(on_any: int) -> None:
    """Without kill-on-close, the reaper leaves running processes alone after the owner is
    killed, and removes the cgroups once they are gone."""
    code = (
        "import json, os\n"
        "from isobox.jobs import Job\n"
        "job = Job(kill_on_close=False)\n"
        "p = job.spawn(['sleep', '2'])\n"
        "print(json.dumps([job.cgroup.dirs(), p.pid]), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    dirs, sleeper = json.loads(_run_owner(code))
    try:
        time.sleep(1.0)
        assert os.path.exists(f"/proc/{sleeper}"), "killed although not kill-on-close"
        assert all(os.path.exists(d) for d in dirs)
        deadline = time.monotonic() + 10
        while any(os.path.exists(d) for d in dirs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(d) for d in dirs)
    finally:
        _rmtree_cgroup(dirs)
        _kill(sleeper)
