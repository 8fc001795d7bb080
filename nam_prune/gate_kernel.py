"""The fused CPU kernel for training NAM gates (``gate_kernel.c``), built on first use.

Written with torch ops, a training gate makes about ten passes over its feature map forward and
backward; the C kernel makes the four a plain batch norm makes (statistics, output; gradient
sums, input gradient), recomputing the sigmoid instead of keeping extra maps. Compiled with the
system C compiler (``$CC``, else ``cc``) into a per-user cache, loaded with ctypes; where it
cannot be built (no compiler, no OpenMP) training runs the torch ops, which agree within float
rounding (1e-5) and are slower: :func:`status` says which. ``NAM_PRUNE_GATE_KERNEL=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gate_kernel.c")
FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
TARGETS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
"""Tried in order until one builds. -march=native lets the loops use the CPU's vectors (the library
is built where it runs); gcc keeps to 256-bit ones unless told to prefer 512, which speeds up the
four passes on AVX-512 CPUs (docs/performance.md); other compilers or CPUs may know neither option."""

_pointer, _size, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "nam_gate_stats": [_pointer, _size, _size, _size, _pointer, _pointer, _int],
    "nam_gate_forward": [_pointer, _pointer, _size, _size, _size] + [_pointer] * 6 + [_int],
    "nam_gate_backward_sums": [_pointer, _size, _pointer, _size, _size, _size] + [_pointer] * 7 + [_int],
    "nam_gate_backward_input": [_pointer, _size, _pointer, _pointer, _size, _size, _size] + [_pointer] * 10 + [_int],
}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nam-prune" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags: part of the cache key, since the library is built for this CPU."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


STALE_BUILD_S = 3600
"""A build folder this old was left by a killed process (a build takes seconds; two tries of at most 300 s)."""


def _compile(compiler: list[str], target: Path) -> str | None:
    """Build the library at ``target`` (written beside it, then renamed); the compiler's error on failure.
    Build folders that killed processes left behind are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("build-*"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for extra in TARGETS:
            result = subprocess.run(
                [*compiler, *FLAGS, *extra, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=300
            )
            if result.returncode == 0:
                os.replace(built, target)
                return None
        lines = result.stderr.strip().splitlines()
        return next((line for line in lines if "error" in line), lines[-1] if lines else f"{compiler[0]} failed")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and a line saying what training gates run on (never raises: the torch ops always work)."""
    if os.environ.get("NAM_PRUNE_GATE_KERNEL", "1") == "0":
        return None, "torch ops (NAM_PRUNE_GATE_KERNEL=0)"
    compiler = shlex.split(os.environ.get("CC", "cc"))  # e.g. "ccache gcc"
    if not compiler or not shutil.which(compiler[0]):
        name = " ".join(compiler)
        return None, f"torch ops (no C compiler {name!r} for the fused gate kernel; install gcc for faster training)"
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), repr((FLAGS, TARGETS)).encode(), version.encode(), _cpu_flags().encode()]))
        target = _cache_dir() / f"gate_kernel-{key.hexdigest()[:16]}.so"
        error = None if target.exists() else _compile(compiler, target)
        if error:
            return None, f"torch ops (the fused gate kernel did not build: {error})"
        library = ctypes.CDLL(str(target))
        for name, arguments in _SIGNATURES.items():
            getattr(library, name).argtypes = arguments
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        # an unwritable or foreign cache, a broken compiler, no home directory
        return None, f"torch ops (the fused gate kernel is unavailable: {exc})"
    return library, f"fused CPU kernel ({target})"


_enabled = True


@contextlib.contextmanager
def disabled():
    """Train gates on torch ops inside the block (the reference path): for tests and benchmarks."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def status() -> str:
    """What NAM gates train with on the CPU: the fused kernel, or torch ops and why."""
    return _load()[1]


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel can run this feature map: float32 NCHW-contiguous on the CPU, not under tracing."""
    return (
        not torch._dynamo.is_compiling()  # torch.compile traces the torch-op form (torch >= 2.1)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous()
        and not torch.jit.is_tracing()
        and _enabled
        and _load()[0] is not None
    )


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _layout(x: torch.Tensor) -> tuple[int, int, int]:
    n, channels = x.shape[:2]
    return n, channels, x.numel() // (n * channels)


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``x``."""
    n, channels, hw = _layout(x)
    mean, var = x.new_empty(channels), x.new_empty(channels)
    _load()[0].nam_gate_stats(*_pointers(x), n, channels, hw, *_pointers(mean, var), torch.get_num_threads())
    return mean, var


def forward(x: torch.Tensor, per_channel: list[torch.Tensor]) -> torch.Tensor:
    """``(a x_hat + b) sigmoid(c x_hat + d)``; ``per_channel`` is ``[mean, invstd, a, b, c, d]``."""
    n, channels, hw = _layout(x)
    out, vectors = torch.empty_like(x), _vectors(per_channel)  # kept alive through the call
    _load()[0].nam_gate_forward(*_pointers(x, out), n, channels, hw, *_pointers(*vectors), torch.get_num_threads())
    return out


def backward_sums(grad: torch.Tensor, x: torch.Tensor, per_channel: list[torch.Tensor]) -> torch.Tensor:
    """``(4, C)`` float64: sums of ``g_u``, ``g_u x_hat``, ``g_z``, ``g_z x_hat`` (see ``gate_kernel.c``)."""
    n, channels, hw = _layout(x)
    sums, vectors, grad = x.new_empty((4, channels), dtype=torch.float64), _vectors(per_channel), _planar(grad)
    _load()[0].nam_gate_backward_sums(
        grad.data_ptr(), grad.stride(0), x.data_ptr(), n, channels, hw, *_pointers(*vectors, sums), torch.get_num_threads()
    )
    return sums


def backward_input(grad: torch.Tensor, x: torch.Tensor, per_channel: list[torch.Tensor]) -> torch.Tensor:
    """``dL/dx``; ``per_channel`` is ``[mean, invstd, a, b, c, d, u_scale, z_scale, slope, offset]``."""
    n, channels, hw = _layout(x)
    grad_x, vectors, grad = torch.empty_like(x), _vectors(per_channel), _planar(grad)
    _load()[0].nam_gate_backward_input(
        grad.data_ptr(), grad.stride(0), *_pointers(x, grad_x), n, channels, hw, *_pointers(*vectors), torch.get_num_threads()
    )
    return grad_x


def _planar(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` itself when each of its (sample, channel) planes is contiguous and a sample's channels
    follow each other (a channel slice of a larger gradient, as ``torch.cat``'s backward hands out);
    a contiguous copy otherwise."""
    _, _, height, width = grad.shape
    planar = grad.stride()[1:] == (height * width, width, 1) or grad.shape[2:].numel() == 1 and grad.stride(1) == 1
    return grad if planar else grad.contiguous()


def _vectors(per_channel: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous float32 copies where needed (the C side reads plain arrays)."""
    return [t.detach().to(torch.float32).contiguous() for t in per_channel]
