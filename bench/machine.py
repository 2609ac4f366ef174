"""What every bench reports beside its timings: the machine, its matmul rate, and peak memory per variant.

Imported by the bench scripts (python bench/<script>.py puts this folder on sys.path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what bf16 matmuls need


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def describe(device: torch.device) -> str:
    """One paragraph: device, CPU model, cores, torch's threads, bf16-relevant CPU features, load."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    features = ", ".join(f for f in CPU_FEATURES if f in flags) or "none of " + ", ".join(CPU_FEATURES)
    threads = f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads"
    lines = [
        f"CPU: {cpu_model()}, {cores} cores usable, torch {torch.__version__} with {threads}, "
        f"kernels {torch.backends.cpu.get_cpu_capability()}",
        f"CPU features for bf16: {features}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
    ]
    if device.type == "cuda":
        lines.insert(0, f"GPU: {torch.cuda.get_device_name(device)}")
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Measured FLOP/s of a square size^3 matmul (best of `repeats`): the ceiling MFU is computed against.

    `clock` is the one the bench times its variants with (time.process_time for CPU time).
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = clock()
        a @ b
        sync(device)
        best = min(best, clock() - started)
    return 2 * size**3 / best


def read_bandwidth(clock: Callable[[], float] = time.perf_counter, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s this process reads from memory: the best of `repeats` sums over a `mib` MiB fp32 tensor.

    The ceiling of batch-1 decoding, which reads every weight once per token.
    """
    data = torch.ones(mib * 2**20 // 4)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        data.sum()
        best = min(best, clock() - started)
    return data.numel() * 4 / best


def _trim() -> None:
    """Hand freed memory back to the OS (glibc), so an RSS baseline is what the process really holds."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak on a GPU; on Linux CPUs the peak resident set.

    On a CPU the peak RSS (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so `extra_mib` is the
    working memory the block added on top of what the process held before it (models, data, optimizer
    state of every variant). None where neither counter exists.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = device.type == "cpu" and Path("/proc/self/clear_refs").exists()
        self.base_mib = self.peak_mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu:
            _trim()
            Path("/proc/self/clear_refs").write_text("5")
            self.base_mib = _status_kb("VmRSS") / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.cpu:
            self.peak_mib = _status_kb("VmHWM") / 1024

    @property
    def extra_mib(self) -> float | None:
        if self.device.type == "cuda":
            return self.peak_mib
        return self.peak_mib - self.base_mib if self.cpu else None
