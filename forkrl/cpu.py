"""Process settings and measurements that make PyTorch fast on a CPU.

glibc's malloc hands blocks above 128 KiB to mmap and returns them to the kernel on free, so every
large tensor (a [128, 49k] softmax, an activation) comes back as fresh pages that fault in on first
touch: at decode batch 128 that was 60% of the sampling step. `tune_allocator` raises the mmap and
trim thresholds so freed blocks stay in the heap and are reused (what jemalloc/tcmalloc give
PyTorch-on-CPU deployments, without preloading a library). The cost is memory: freed blocks are
not returned to the system, and fragmentation raised peak RSS by ~0.5-0.7 GB in the RL step
benchmark (7.3 vs 6.6 GB, for 15.6 vs 22.4 s per step).

A CPU flag does not say whether bf16 matrix products are faster than float32 ones: with AVX-512
BF16, 2 cores of an AMD EPYC multiply 2048x2048 bf16 matrices at about 800 GFLOP/s, while 2 cores of
an Intel Xeon that has the same flag (and AMX hidden by its hypervisor) reach 148 GFLOP/s in bf16
against 248 in float32. `bf16_matmul_speedup` therefore times both once per process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse (glibc only; a no-op elsewhere). Returns whether it applied."""
    global _tuned
    if _tuned is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            _tuned = False
    return _tuned


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernel for the shape on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_matmul_speedup(k: int = 576, n: int = 1536, rows: int = 1024, repeats: int = 5) -> float:
    """How many times faster a [rows, k] x [k, n] product runs in bf16 than in float32 on this CPU with
    the current thread count (best of `repeats` each; about 0.15 s in all for SmolLM2-135M's 576 x
    1536). Logged once. Under torch.distributed every rank gets the smallest of the ranks' figures,
    so all decide alike."""
    import torch

    g = torch.Generator().manual_seed(0)   # a private generator: timing must not move the run's random state
    a, b = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    speedup = _seconds(lambda: a @ b, repeats) / _seconds(lambda: a16 @ b16, repeats)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([speedup], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        speedup = float(t)
    logging.getLogger("forkrl").info("bf16 matrix products (%dx%dx%d) run %.2fx as fast as float32 on this CPU "
                                     "(%d threads)", rows, k, n, speedup, torch.get_num_threads())
    return speedup
