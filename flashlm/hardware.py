"""What machine this is, and which precision pays on it.

bf16 autocast is fast on CUDA and on CPUs with native bf16 matmul units (Intel AMX, AVX512-BF16), and a
trap elsewhere: on a CPU without them (e.g. AVX2 only) PyTorch emulates bf16 matmuls far more slowly
than fp32. So ``precision: auto`` resolves to bf16 on CUDA and on native-bf16 CPUs, fp32 otherwise, and a
forced ``bf16`` on a CPU without native support prints one warning. `machine_info` is what every result
file records, so that a figure is never read against the wrong machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from flashlm.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
_warned: set[str] = set()


def cpu_bf16_support() -> dict[str, bool]:
    """The CPU's native bf16 features as torch reports them: AMX tiles and AVX512-BF16."""

    def probe(name: str) -> bool:
        check = getattr(torch.cpu, name, None)
        try:
            return bool(check()) if check is not None else False
        except RuntimeError:
            return False

    return {"amx": probe("_is_amx_tile_supported"), "avx512_bf16": probe("_is_avx512_bf16_supported")}


def cpu_has_native_bf16() -> bool:
    return any(cpu_bf16_support().values())


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision a run uses on `device`: "bf16" or "fp32" (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp32":
        return "fp32"
    native = kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16())
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native and "bf16" not in _warned:
        _warned.add("bf16")
        print(
            f"warning: bf16 on this {kind.upper()} ({cpu_model()}) has no native bf16 units and runs much "
            "slower than fp32; use --precision auto (or fp32) for the fast path",
            file=sys.stderr,
        )
    return "bf16"


def default_device(name: str = "auto", index: int | None = None) -> torch.device:
    """The device for ``name``: "auto" is CUDA (device `index`) when available, else the CPU; any other
    name is taken as it is, once checked (a name torch knows; CUDA only where it is available). The one place
    FlashLM auto-detects and checks its device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r}: not a device; use auto, cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine; use cpu (or auto)")
    return torch.device(device.type, index) if device.type == "cuda" and index is not None else device


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """The hardware and software a measurement ran on: CPU model, bf16/AMX support, torch's CPU
    capability, CPU count and torch threads, GPU (if any), versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        **{f"cpu_{k}": v for k, v in cpu_bf16_support().items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak_flops(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5
) -> float:
    """FLOP/s of an n x n matmul on `device` in `dtype`: the median of `reps` timed runs after a warm-up
    (a fraction of a second on a CPU). The denominator of model FLOPs utilisation."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def timed() -> float:
        began = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    timed()
    return 2 * n**3 / statistics.median(timed() for _ in range(reps))


def describe(info: dict[str, Any]) -> str:
    """One line for a report: CPU, its bf16 support and capability, threads (and GPU). Records written
    before these fields existed say what they lack."""
    if "cpu_capability" not in info:
        return f"{info.get('cpu', 'unknown CPU')}, {info.get('cpus', '?')} CPUs (bf16 support not recorded)"
    native = [k for k in ("amx", "avx512_bf16") if info.get(f"cpu_{k}")]
    bf16 = f"native bf16 ({', '.join(native)})" if native else "no native bf16"
    gpu = f"; GPU {info['gpu']}" if info.get("gpu") else ""
    return (
        f"{info['cpu']}, {info['cpus']} CPUs, {info['cpu_capability']}, {bf16}; "
        f"{info['torch_threads']} torch threads; torch {info['torch']}{gpu}"
    )


__all__ = [
    "PRECISIONS",
    "cpu_bf16_support",
    "cpu_has_native_bf16",
    "cpu_model",
    "describe",
    "dtype_of",
    "machine_info",
    "matmul_peak_flops",
    "resolve_precision",
]
