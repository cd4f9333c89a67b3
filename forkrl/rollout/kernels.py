"""Compiled CPU kernels for the decode step (`decode_kernels.cpp`), built on first use with
PyTorch's C++-extension loader and cached under ~/.cache/forkrl/kernels (FORKRL_CACHE moves it).

The build takes ~20 s once per machine and PyTorch version (`build_seconds` says how long this
process spent); it is compiled with -march=native, so the cache is keyed by the CPU's feature
flags too. Where it cannot be built (no C++ compiler, no ninja, not Linux/x86) `decode_kernel()`
returns None after one warning and the runner keeps its PyTorch path, which computes the same
thing. FORKRL_KERNELS=0 turns the kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from forkrl.models.loader import cache_dir

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("decode_kernels.cpp")
_module = None
_tried = False
build_seconds = 0.0


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def _build_dir() -> Path:
    key = hashlib.sha1(f"{_cpu_flags()}|{torch.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / "kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def decode_kernel():
    """The compiled module (decode_attention, add_rms_norm, silu_mul, sample), or None where it is
    off or cannot be built."""
    global _module, _tried, build_seconds
    if _tried:
        return _module
    _tried = True
    if os.environ.get("FORKRL_KERNELS", "1") == "0":
        return None
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load
        _module = load("forkrl_decode_kernels", [str(_SOURCE)], build_directory=str(_build_dir()),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as err:  # noqa: BLE001  (any build failure means: run the PyTorch path)
        log.warning("forkrl: the compiled decode kernel could not be built (%s); decoding uses the "
                    "PyTorch path (same results, slower)", str(err).splitlines()[0] if str(err) else type(err).__name__)
        _module = None
    build_seconds = time.perf_counter() - start
    return _module
