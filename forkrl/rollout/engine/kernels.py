"""Compiled CPU kernels for the decode step (`decode_kernels.cpp`), built on first use with
PyTorch's C++-extension loader and cached under ~/.cache/forkrl/kernels (FORKRL_CACHE moves it).

The build takes ~20 s once per machine and environment and says so in the log (`build_seconds` says
how long this process spent); the cache is keyed by the whole compile command (source, flags,
compiler, CPU features, Python, the torch installation), since -march=native builds are per CPU. Where it cannot be built (no C++ compiler, no ninja, not Linux/x86) `decode_kernel()`
returns None after one warning and the runner keeps its PyTorch path, which computes the same
thing. FORKRL_KERNELS=0 turns the kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
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


_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _compiler() -> str:
    import subprocess
    cxx = os.environ.get("CXX", "c++")
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        return f"{cxx}: {first[0] if first else ''}"
    except (OSError, subprocess.SubprocessError):
        return cxx


def _build_dir() -> Path:
    """One build folder per compile command: the source, flags, compiler, CPU features, Python and the
    torch installation whose headers it includes. Two environments on one machine then keep two builds
    instead of rebuilding each other's (PyTorch's loader rebuilds when any of these changed)."""
    from torch.utils.cpp_extension import include_paths
    # sys.prefix, not sys.executable: python, python3 and python3.11 of one environment share a build
    parts = [_SOURCE.read_text(), " ".join(_CFLAGS + _LDFLAGS), _compiler(), _cpu_flags(), sys.prefix,
             sys.version, torch.__version__, *include_paths()]
    key = hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
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
        build_dir = _build_dir()
        fresh = not any(build_dir.glob("*.so"))
        if fresh:
            log.info("building the CPU decode kernels, once for this machine and environment (~20 s; cached in %s)",
                     build_dir)
        _module = load("forkrl_decode_kernels", [str(_SOURCE)], build_directory=str(build_dir),
                       extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS))  # load() appends to them
        if fresh:
            log.info("built the CPU decode kernels in %.0f s", time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001  (any build failure means: run the PyTorch path)
        log.warning("forkrl: the compiled decode kernel could not be built (%s); decoding uses the "
                    "PyTorch path (same results, slower)", str(err).splitlines()[0] if str(err) else type(err).__name__)
        _module = None
    build_seconds = time.perf_counter() - start
    return _module
