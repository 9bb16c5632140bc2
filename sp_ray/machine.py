"""What a benchmark says about the machine it ran on: the CPU model, its cores and the ISA flags that
decide which kernels onnxruntime and PyTorch pick (plain Python, no torch)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

# Flags that change the speed of fp32 and int8 kernels: AVX2 / AVX-512 for fp32, VNNI and AMX for int8
# dot products (without VNNI, onnxruntime's U8S8 kernels fall back to AVX2 / AVX-512BW multiply-adds).
ISA_PREFIXES = ("avx2", "avx512", "avx_vnni", "amx")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model or platform.processor() or "unknown CPU", flags


def cpu_name() -> str:
    """The CPU model ("Intel(R) Xeon(R) Processor", "AMD EPYC 7B13", ...)."""
    return _cpuinfo()[0]


def isa_flags() -> list[str]:
    """The CPU's vector ISA flags (``ISA_PREFIXES``), sorted; empty where /proc/cpuinfo is absent."""
    return sorted(flag for flag in _cpuinfo()[1] if flag.startswith(ISA_PREFIXES))


def int8_flags() -> list[str]:
    """The int8 dot-product flags among ``INT8_FLAGS`` the CPU has (empty: no VNNI, int8 runs slower)."""
    flags = _cpuinfo()[1]
    return [flag for flag in INT8_FLAGS if flag in flags]


def cpu_facts() -> dict[str, object]:
    """{"cpu", "cores", "isa", "int8_isa"} of this machine, for benchmark headers and JSON."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": isa_flags(), "int8_isa": int8_flags()}


def describe_cpu() -> str:
    """One line for a table header: model, cores, int8 flags ("no VNNI" when there are none)."""
    int8 = int8_flags()
    return f"{cpu_name()}, {os.cpu_count()} cores, {', '.join(int8) if int8 else 'no VNNI'}"
