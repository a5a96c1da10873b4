"""Seccomp filters from an OCI ``linux.seccomp`` document, compiled by libseccomp (ctypes).

:func:`compile_filter` validates the document and builds a libseccomp filter context;
:meth:`Filter.load` installs it in the *calling* process (a container's init calls it last,
after ``no_new_privs``, right before exec); :meth:`Filter.export_bpf` gives the raw BPF
program. :func:`default_profile` returns the engine's default profile for a capability set.

Semantics follow the OCI runtime spec and, where the spec is silent, runc:

* ``defaultAction`` is required; ``defaultErrnoRet`` and ``syscalls[].errnoRet`` apply to
  ``SCMP_ACT_ERRNO`` and ``SCMP_ACT_TRACE`` only (EPERM when absent) and are an error on
  any other action. ``SCMP_ACT_KILL`` is ``SCMP_ACT_KILL_THREAD``.
* The native architecture is always in the filter; ``architectures`` adds others.
* ``flags``: ``SECCOMP_FILTER_FLAG_TSYNC``, ``_LOG`` and ``_SPEC_ALLOW`` map to the libseccomp
  attributes ``CTL_TSYNC``, ``CTL_LOG`` and ``CTL_SSB``.
* ``SCMP_FLTATR_CTL_NNP`` is 0: libseccomp never sets no_new_privs; the runtime does that
  itself when ``process.noNewPrivileges`` asks for it.
* A syscall name this libseccomp does not know is skipped and listed in
  :attr:`Filter.unknown` (a profile names syscalls newer than the library or the kernel).
* A rule whose action equals the default action is skipped (libseccomp refuses it).
* The ``args`` of one rule are ANDed. libseccomp cannot AND two comparisons on the *same*
  argument, so, as runc does, a rule that compares one argument more than once becomes one
  rule per comparison (ORed).
* ``SCMP_CMP_MASKED_EQ`` is ``(arg & value) == valueTwo``.

Every document error is :class:`isobox.errors.InvalidDocument` naming the field
(``seccomp.syscalls[3].args[0].op``); a failing library call is
:class:`isobox.errors.SystemError_` naming the call, its target and the errno.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import errno as _errno
import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from isobox.errors import InvalidDocument, SystemError_, ToolMissing

# ---- libseccomp constants (seccomp.h, libseccomp 2.5) -------------------------------------

_ACT_KILL_PROCESS = 0x80000000
_ACT_KILL_THREAD = 0x00000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000
_RET_DATA = 0x0000FFFF

# OCI action name -> (base action, whether errnoRet applies)
ACTIONS: dict[str, tuple[int, bool]] = {
    "SCMP_ACT_KILL": (_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_THREAD": (_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_PROCESS": (_ACT_KILL_PROCESS, False),
    "SCMP_ACT_TRAP": (_ACT_TRAP, False),
    "SCMP_ACT_ERRNO": (_ACT_ERRNO, True),
    "SCMP_ACT_TRACE": (_ACT_TRACE, True),
    "SCMP_ACT_ALLOW": (_ACT_ALLOW, False),
    "SCMP_ACT_LOG": (_ACT_LOG, False),
}

OPERATORS: dict[str, int] = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

# AUDIT_ARCH_* values, which libseccomp uses as architecture tokens (x32 is libseccomp's own).
ARCHITECTURES: dict[str, int] = {
    "SCMP_ARCH_X86": 0x40000003,
    "SCMP_ARCH_X86_64": 0xC000003E,
    "SCMP_ARCH_X32": 0x4000003E,
    "SCMP_ARCH_ARM": 0x40000028,
    "SCMP_ARCH_AARCH64": 0xC00000B7,
}

# enum scmp_filter_attr
_FLTATR_CTL_NNP = 3
_FLTATR_CTL_TSYNC = 4
_FLTATR_CTL_LOG = 6
_FLTATR_CTL_SSB = 7
_FLTATR_CTL_OPTIMIZE = 8
_FLTATR_API_SYSRAWRC = 9  # report the kernel's errno instead of ECANCELED
_FLTATR_CTL_WAITKILL = 10  # libseccomp >= 2.6

FLAGS: dict[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": _FLTATR_CTL_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": _FLTATR_CTL_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": _FLTATR_CTL_SSB,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": _FLTATR_CTL_WAITKILL,
}

# seccomp(2): what libseccomp's seccomp_load passes for each attribute (FrozenFilter.load
# makes the same call with the program libseccomp generated).
_SECCOMP_SET_MODE_FILTER = 1
KERNEL_FLAGS: dict[str, int] = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 32,
}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "i386": 354, "i686": 354, "armv7l": 383}
_NR_SECCOMP = _SYS_SECCOMP.get(platform.machine())
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CACHE_SIZE = 16

_NR_SCMP_ERROR = -1  # seccomp_syscall_resolve_name: unknown name
_MAX_ARGS = 6  # a syscall has at most six arguments
_U64 = (1 << 64) - 1
# libseccomp <= 2.5.4 misbehaves with the binary-tree layout and no rules; runc enables the
# layout above this many rules, and so do we.
_BINARY_TREE_ABOVE = 32


# one comparison: (argument index, operator, datum_a, datum_b)
_Cmp = tuple[int, int, int, int]


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp"""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _Version(ctypes.Structure):
    """struct scmp_version"""

    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise ToolMissing(
            f"libseccomp is needed for seccomp filters ({exc}): apt-get install libseccomp2"
        ) from exc
    ctx = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctx
    lib.seccomp_release.argtypes = [ctx]
    lib.seccomp_release.restype = None
    lib.seccomp_arch_add.argtypes = [ctx, ctypes.c_uint32]
    lib.seccomp_arch_native.argtypes = []
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_attr_set.argtypes = [ctx, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctx, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]
    lib.seccomp_load.argtypes = [ctx]
    lib.seccomp_export_bpf.argtypes = [ctx, ctypes.c_int]
    lib.seccomp_version.argtypes = []
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    return lib


def library_version() -> tuple[int, int, int]:
    """(major, minor, micro) of the libseccomp in use."""
    v = _lib().seccomp_version().contents
    return int(v.major), int(v.minor), int(v.micro)


def _check(rc: int, op: str, target: str) -> None:
    # libseccomp returns -errno on failure (and sets no errno of its own)
    if rc < 0:
        raise SystemError_(op, target, -rc)


def resolve_syscall(name: str) -> int | None:
    """The number libseccomp gives ``name`` (negative for a syscall that exists only on other
    architectures), or None when this libseccomp does not know the name."""
    num = int(_lib().seccomp_syscall_resolve_name(name.encode()))
    return None if num == _NR_SCMP_ERROR else num


class Filter:
    """A compiled filter (a libseccomp context). Load it, export it, then release it."""

    def __init__(self, ctx: int | None, unknown: Sequence[str], rules: int) -> None:
        self._ctx: int | None = ctx
        #: the seccomp(2) flags its profile asks for (``flags``)
        self.kernel_flags = 0
        self._bpf: bytes | None = None  # set by freeze()
        #: syscall names the profile lists that this libseccomp does not know (skipped)
        self.unknown: tuple[str, ...] = tuple(unknown)
        #: libseccomp rules added (one per syscall name and condition set)
        self.rules = rules

    def _live(self, op: str) -> int:
        if self._ctx is None:
            raise ValueError(f"seccomp filter: {op} after release()")
        return self._ctx

    def load(self) -> None:
        """Install the filter in the calling process (all threads with ``..._FLAG_TSYNC``).

        The kernel accepts it only with no_new_privs set or CAP_SYS_ADMIN held."""
        if self._bpf is not None:
            _load_bpf(self._bpf, self.kernel_flags)
            return
        _check(_lib().seccomp_load(self._live("load")), "seccomp_load", "filter")

    def freeze(self) -> Filter:
        """Generate the BPF program now and free the libseccomp context: from then on
        :meth:`load` installs that program with seccomp(2), the call ``seccomp_load`` makes
        with the program it would generate again at every load (~8 ms for the default
        profile). A frozen filter is plain bytes: it survives fork and needs neither
        libseccomp nor the host's files to load. Returns self."""
        if self._bpf is None:
            self._bpf = self.export_bpf()
            ctx, self._ctx = self._ctx, None
            if ctx is not None:
                _lib().seccomp_release(ctx)
            _libc()  # resolved now, while the host's files are in reach
        return self

    @property
    def frozen(self) -> bool:
        return self._bpf is not None

    def export_bpf(self) -> bytes:
        """The BPF program (``struct sock_filter`` array) libseccomp would load."""
        if self._bpf is not None:
            return self._bpf
        ctx = self._live("export_bpf")
        fd = os.memfd_create("isobox-seccomp-bpf", os.MFD_CLOEXEC)
        try:
            _check(_lib().seccomp_export_bpf(ctx, fd), "seccomp_export_bpf", "memfd")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def release(self) -> None:
        """Free the libseccomp context (a loaded filter stays in force). Idempotent."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            _lib().seccomp_release(ctx)

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


# ---- validation ---------------------------------------------------------------------------


def _uint(value: object, field: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidDocument(f"{field}: must be an integer from 0 to {limit}, got {value!r}")
    return value


def _action(name: object, errno_ret: object, field: str, errno_field: str) -> int:
    if not isinstance(name, str) or name not in ACTIONS:
        raise InvalidDocument(
            f"{field}: unknown or unsupported seccomp action {name!r} "
            f"(supported: {', '.join(ACTIONS)})"
        )
    base, takes_errno = ACTIONS[name]
    if errno_ret is None:
        return base | _errno.EPERM if takes_errno else base
    if not takes_errno:
        raise InvalidDocument(f"{errno_field}: {name} does not return an errno")
    return base | _uint(errno_ret, errno_field, _RET_DATA)


def _arg(raw: object, field: str) -> _Cmp:
    if not isinstance(raw, Mapping):
        raise InvalidDocument(f"{field}: must be an object")
    index = _uint(raw.get("index"), f"{field}.index", _MAX_ARGS - 1)
    value = _uint(raw.get("value"), f"{field}.value", _U64)
    value_two = _uint(raw.get("valueTwo", 0), f"{field}.valueTwo", _U64)
    op = raw.get("op")
    if not isinstance(op, str) or op not in OPERATORS:
        raise InvalidDocument(
            f"{field}.op: unknown seccomp operator {op!r} (supported: {', '.join(OPERATORS)})"
        )
    return index, OPERATORS[op], value, value_two


def _string_list(raw: object, field: str, *, non_empty: bool = False) -> list[str]:
    if raw is None and not non_empty:
        return []
    if (not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw)
            or (non_empty and not raw)):
        what = "a non-empty list" if non_empty else "a list"
        raise InvalidDocument(f"{field}: must be {what} of non-empty strings")
    return list(raw)


def _condition_sets(conds: list[_Cmp]) -> list[list[_Cmp]]:
    """One AND-set, or (an argument compared twice) one set per comparison, as runc does."""
    indexes = [c[0] for c in conds]
    if len(set(indexes)) == len(indexes):
        return [conds]
    return [[c] for c in conds]


# ---- compile ------------------------------------------------------------------------------


def compile_filter(profile: Mapping[str, Any]) -> Filter:
    """Validate an OCI ``linux.seccomp`` object and compile it into a :class:`Filter`."""
    if not isinstance(profile, Mapping):
        raise InvalidDocument("seccomp: must be an object")
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"),
                      "seccomp.defaultAction", "seccomp.defaultErrnoRet")
    arches = _string_list(profile.get("architectures"), "seccomp.architectures")
    for i, arch in enumerate(arches):
        if arch not in ARCHITECTURES:
            raise InvalidDocument(
                f"seccomp.architectures[{i}]: unknown or unsupported architecture {arch!r} "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
    flags = _string_list(profile.get("flags"), "seccomp.flags")
    for i, flag in enumerate(flags):
        if flag not in FLAGS:
            raise InvalidDocument(f"seccomp.flags[{i}]: unknown seccomp flag {flag!r}")
    raw_calls = profile.get("syscalls") or []
    if not isinstance(raw_calls, list):
        raise InvalidDocument("seccomp.syscalls: must be a list")

    # Validate every rule before touching the library.
    rules: list[tuple[str, list[str], int, list[_Cmp]]] = []
    for i, call in enumerate(raw_calls):
        field = f"seccomp.syscalls[{i}]"
        if not isinstance(call, Mapping):
            raise InvalidDocument(f"{field}: must be an object")
        for key in ("includes", "excludes"):
            if key in call:
                raise InvalidDocument(
                    f"{field}.{key}: not an OCI field; resolve the profile first "
                    "(isobox._sys.seccomp.default_profile does)"
                )
        names = _string_list(call.get("names"), f"{field}.names", non_empty=True)
        action = _action(call.get("action"), call.get("errnoRet"),
                         f"{field}.action", f"{field}.errnoRet")
        raw_args = call.get("args") or []
        if not isinstance(raw_args, list):
            raise InvalidDocument(f"{field}.args: must be a list")
        conds = [_arg(a, f"{field}.args[{j}]") for j, a in enumerate(raw_args)]
        rules.append((field, names, action, conds))

    lib = _lib()
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SystemError_("seccomp_init", hex(default), _errno.EINVAL)
    filt = Filter(ctx, (), 0)
    try:
        for arch in arches:
            rc = lib.seccomp_arch_add(ctx, ARCHITECTURES[arch])
            if rc != -_errno.EEXIST:  # the native architecture is always there
                _check(rc, "seccomp_arch_add", arch)
        for i, flag in enumerate(flags):
            rc = lib.seccomp_attr_set(ctx, FLAGS[flag], 1)
            if rc < 0:
                major, minor, micro = library_version()
                raise InvalidDocument(
                    f"seccomp.flags[{i}]: {flag} is not supported by libseccomp "
                    f"{major}.{minor}.{micro} on this kernel ({os.strerror(-rc)})"
                )
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0), "seccomp_attr_set", "CTL_NNP")
        lib.seccomp_attr_set(ctx, _FLTATR_API_SYSRAWRC, 1)  # libseccomp >= 2.5.0; else ignored
        if len(rules) > _BINARY_TREE_ABOVE:
            # Only an optimisation: an older libseccomp without it builds a linear filter.
            lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)

        unknown: list[str] = []
        added = 0
        for field, names, action, conds in rules:
            if action == default:
                continue
            sets = _condition_sets(conds)
            for name in names:
                num = resolve_syscall(name)
                if num is None:
                    if name not in unknown:
                        unknown.append(name)
                    continue
                for cset in sets:
                    arr = (_ArgCmp * max(1, len(cset)))(*(_ArgCmp(*c) for c in cset))
                    rc = lib.seccomp_rule_add_array(ctx, action, num, len(cset), arr)
                    if rc in (-_errno.EINVAL, -_errno.EEXIST, -_errno.EDOM, -_errno.EACCES):
                        raise InvalidDocument(
                            f"{field}: libseccomp refused the rule for {name!r}: "
                            f"{os.strerror(-rc)}"
                        )
                    _check(rc, "seccomp_rule_add", name)
                    added += 1
        filt.unknown = tuple(unknown)
        filt.rules = added
        for flag in flags:
            filt.kernel_flags |= KERNEL_FLAGS[flag]
    except BaseException:
        filt.release()
        raise
    return filt


# ---- compiled once per profile ---------------------------------------------------------------

_compiled: dict[str, Filter] = {}


def profile_key(profile: Mapping[str, Any]) -> str | None:
    """A digest of the profile's JSON (keys sorted); None if it is not JSON."""
    try:
        text = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def compile_cached(profile: Mapping[str, Any]) -> Filter:
    """:func:`compile_filter`, frozen (:meth:`Filter.freeze`), once per distinct profile.

    A process that compiles a profile before it forks (the monitors' zygote warms the
    engine's default profile) hands the program to every child: each container start
    would otherwise spend ~5 ms compiling and ~8 ms generating the same BPF. The key is
    the profile's whole JSON, so a different profile never gets another's program. The
    cached filters are shared: never release one."""
    key = profile_key(profile)
    if key is None:
        return compile_filter(profile).freeze()
    filt = _compiled.get(key)
    if filt is None:
        filt = compile_filter(profile).freeze()
        while len(_compiled) >= _CACHE_SIZE:
            del _compiled[next(iter(_compiled))]
        _compiled[key] = filt
    return filt


class _SockFprog(ctypes.Structure):
    """struct sock_fprog"""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.prctl.restype = ctypes.c_int
    return lib


def _load_bpf(bpf: bytes, flags: int) -> None:
    """Install a BPF program as ``seccomp_load`` does: seccomp(2) with the profile's
    flags, or prctl(PR_SET_SECCOMP) where seccomp(2) does not exist and no flag is asked."""
    libc = _libc()
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    rc, err = -1, _errno.ENOSYS
    if _NR_SECCOMP is not None:
        rc = libc.syscall(ctypes.c_long(_NR_SECCOMP), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                          ctypes.c_uint(flags), ctypes.byref(prog))
        err = ctypes.get_errno() if rc < 0 else 0
    if rc < 0 and err == _errno.ENOSYS and not flags:
        rc = libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                        ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0))
        err = ctypes.get_errno() if rc < 0 else 0
    if rc < 0:
        raise SystemError_("seccomp_load", "filter", err)
    if rc > 0:  # TSYNC: the id of a thread that could not be synchronised
        raise SystemError_("seccomp_load", f"thread {rc}", _errno.ESRCH)


# ---- the default profile ------------------------------------------------------------------


def _cap_name(cap: str) -> str:
    cap = cap.strip().upper()
    return cap if cap.startswith("CAP_") else f"CAP_{cap}"


def default_profile(capabilities: Iterable[str]) -> dict[str, Any]:
    """The engine's default ``linux.seccomp`` for a container holding ``capabilities``.

    It is read from the package file ``seccomp_default.json``, an OCI seccomp object with
    three engine-only keys, resolved here and absent from the result:

    * ``archMap`` (top level): machine name (``platform.machine()``) -> the ``architectures``
      to filter on that machine. An unknown machine gets no extra architectures.
    * ``includes: {"caps": [...]}`` on a rule group: the group applies only if the container
      holds *every* capability listed.
    * ``excludes: {"caps": [...]}`` on a rule group: the group is dropped if the container
      holds *any* capability listed.

    ``comment`` keys are documentation and are dropped too. Capability names may be given
    with or without the ``CAP_`` prefix, in any case.

    Resolved once per capability set (the result is a fresh copy each call: callers own it).
    """
    out: dict[str, Any] = json.loads(
        _default_profile_json(frozenset(_cap_name(c) for c in capabilities)))
    return out


@functools.lru_cache(maxsize=16)
def _default_profile_json(caps: frozenset[str]) -> str:
    text = resources.files("isobox._sys").joinpath("seccomp_default.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    out: dict[str, Any] = {
        k: copy.deepcopy(v) for k, v in doc.items() if k not in ("archMap", "comment", "syscalls")
    }
    arch_map: Mapping[str, list[str]] = doc.get("archMap", {})
    out["architectures"] = list(arch_map.get(platform.machine(), []))
    syscalls: list[dict[str, Any]] = []
    for group in doc.get("syscalls", []):
        need = {_cap_name(c) for c in group.get("includes", {}).get("caps", [])}
        avoid = {_cap_name(c) for c in group.get("excludes", {}).get("caps", [])}
        if not need <= caps or avoid & caps:
            continue
        syscalls.append({k: copy.deepcopy(v) for k, v in group.items()
                         if k not in ("includes", "excludes", "comment")})
    out["syscalls"] = syscalls
    return json.dumps(out)
