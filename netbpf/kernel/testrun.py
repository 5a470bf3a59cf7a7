"""BPF_PROG_TEST_RUN for XDP and TC (SCHED_CLS) programs: one packet in, verdict and packet out.

Through libbpf.so.1's bpf_prog_test_run_opts on an fd from the loader; no bcc, no attach.
Verdict codes and their names live here too, for tests and the stats output.
"""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from netbpf.kernel import bpfsys
from netbpf.kernel.bpfsys import FdLike

XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4
XDP_VERDICTS = {XDP_ABORTED: "aborted", XDP_DROP: "drop", XDP_PASS: "pass", XDP_TX: "tx",
                XDP_REDIRECT: "redirect"}

TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_RECLASSIFY = 1
TC_ACT_SHOT = 2
TC_ACT_PIPE = 3
TC_ACT_STOLEN = 4
TC_ACT_QUEUED = 5
TC_ACT_REPEAT = 6
TC_ACT_REDIRECT = 7
TC_ACT_TRAP = 8
TC_VERDICTS = {TC_ACT_UNSPEC: "unspec", TC_ACT_OK: "ok", TC_ACT_RECLASSIFY: "reclassify",
               TC_ACT_SHOT: "shot", TC_ACT_PIPE: "pipe", TC_ACT_STOLEN: "stolen",
               TC_ACT_QUEUED: "queued", TC_ACT_REPEAT: "repeat", TC_ACT_REDIRECT: "redirect",
               TC_ACT_TRAP: "trap"}

MIN_OUT = 1600              # a full Ethernet frame, whatever the program adds
OUT_SLACK = 256             # room for encapsulation a TC program may push


def xdp_verdict_name(code: int) -> str:
    return XDP_VERDICTS.get(code, f"xdp verdict {code}")


def tc_verdict_name(code: int) -> str:
    return TC_VERDICTS.get(code, f"tc verdict {code}")


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts from /usr/include/bpf/bpf.h (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRunResult:
    __test__ = False        # not a pytest test class, despite the name

    retval: int             # signed: TC_ACT_UNSPEC is -1
    data_out: bytes
    duration_ns: int        # kernel's average per repetition
    ctx_out: bytes | None = None


_proto_done = False


def _fn():
    global _proto_done
    lib = bpfsys.libbpf()
    fn = lib.bpf_prog_test_run_opts
    if not _proto_done:
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)]
        fn.restype = ctypes.c_int
        _proto_done = True
    return fn


def test_run(prog_fd: FdLike, data: bytes, repeat: int = 1,
             ctx: bytes | None = None) -> TestRunResult:
    """Run the program on data (an Ethernet frame, at least 14 bytes) repeat times.

    ctx is an optional struct xdp_md / struct __sk_buff image (e.g. ingress_ifindex, mark).
    """
    size_out = max(len(data) + OUT_SLACK, MIN_OUT)
    result = _run(prog_fd, data, repeat, ctx, size_out)
    if isinstance(result, int):
        # ENOSPC: the kernel reports the size the output needed; run again with that room.
        result = _run(prog_fd, data, repeat, ctx, result)
        if isinstance(result, int):
            bpfsys.raise_errno(f"test run of {_label(prog_fd)}", errno.ENOSPC)
    return result


# pytest would collect a module-level `test_run` imported into a test file as a test.
test_run.__test__ = False


def _run(prog_fd: FdLike, data: bytes, repeat: int, ctx: bytes | None,
         size_out: int) -> TestRunResult | int:
    data_in = ctypes.create_string_buffer(bytes(data), len(data) or 1)
    data_out = ctypes.create_string_buffer(size_out)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts))
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = size_out
    opts.repeat = repeat
    ctx_in = ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(bytes(ctx), len(ctx) or 1)
        ctx_out = ctypes.create_string_buffer(len(ctx) or 1)
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(ctx_out, ctypes.c_void_p)
        opts.ctx_size_out = len(ctx)
    ret = _fn()(int(prog_fd), ctypes.byref(opts))
    if ret < 0:
        err = -ret
        if err == errno.ENOSPC and opts.data_size_out > size_out:
            return opts.data_size_out
        bpfsys.raise_errno(f"test run of {_label(prog_fd)} on a {len(data)}-byte packet", err,
                           _hint(err, len(data)))
    retval = ctypes.c_int32(opts.retval).value
    return TestRunResult(retval=retval, data_out=data_out.raw[:opts.data_size_out],
                         duration_ns=opts.duration,
                         ctx_out=ctx_out.raw[:opts.ctx_size_out] if ctx is not None else None)


class VerdictRunner:
    """Many single-packet runs of one program, verdicts only: one options block and one input
    buffer reused, no output copied back (data_out NULL), so a run costs the syscall and little
    Python (selftest sends tens of thousands of probes)."""

    def __init__(self, prog_fd: FdLike, max_size: int = 256):
        self.fd = int(prog_fd)
        self.label = _label(prog_fd)
        self.max_size = max_size
        self.buf = ctypes.create_string_buffer(max_size)
        self.opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), repeat=1)
        self.opts.data_in = ctypes.cast(self.buf, ctypes.c_void_p)
        self.ref = ctypes.byref(self.opts)
        self.call = _fn()

    def retval(self, data: bytes) -> int:
        """The program's return value for one frame (14..max_size bytes)."""
        n = len(data)
        if not 14 <= n <= self.max_size:
            raise ValueError(f"test frames are 14-{self.max_size} bytes (got {n})")
        ctypes.memmove(self.buf, data, n)
        self.opts.data_size_in = n
        self.opts.data_size_out = 0          # libbpf writes the last run's size back here
        ret = self.call(self.fd, self.ref)
        if ret < 0:
            bpfsys.raise_errno(f"test run of {self.label} on a {n}-byte packet", -ret,
                               _hint(-ret, n))
        return ctypes.c_int32(self.opts.retval).value


def _label(fd: FdLike) -> str:
    return fd.label if isinstance(fd, bpfsys.Fd) else f"program fd {fd}"


def _hint(err: int, size: int) -> str:
    if err == errno.EINVAL and size < 14:    # XDP and skb runs both need an Ethernet header
        return "; packets need at least an Ethernet header (14 bytes)"
    if err == errno.EBADF:
        return "; not an open BPF program descriptor"
    return ""
