"""One record of the machine a benchmark ran on (every benchmark's JSON carries it).

CPU model, vendor, family/model numbers, the ISA flags that decide kernel speed (AVX2,
AVX-512, AVX512-BF16, AMX), torch version, threads, and the CPU kernel choices in force
(:func:`ettin.model.cpu.describe`: which library runs the linear layers and why). A speed
figure without these means little: the same code gave 1.6x on an AMD Zen 5 and 1.0x on an
Intel Xeon.
"""

from __future__ import annotations

import os

import torch


def machine(device: str = "cpu", kernels: bool = True) -> dict:
    from ettin.model import cpu as C

    info = C.cpu_info()
    rec = {
        "cpu": info["model"], "cpu_vendor": info["vendor"], "cpu_family": info["family"], "cpu_model_id": info["model_id"],
        "cpu_flags": info["flags"], "logical_cpus": info["logical_cpus"], "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # bench/as_intel_mkl.sh: MKL's Intel kernels forced on (an AMD CPU measured as an Intel one would run MKL)
        "mkl_intel_paths_forced": "mkl-intel-path" in os.environ.get("LD_PRELOAD", ""),
        # glibc malloc settings from the environment, e.g. glibc.malloc.mmap_max=0 (no mmap'd, so no
        # page-faulted, large blocks): they move transformers' speed by up to a third (bench/README.md)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name()
    elif kernels:
        rec["cpu_kernels"] = C.describe()
    return rec


def cpu_model() -> str:
    """The CPU's name (kept for older callers)."""
    from ettin.model import cpu as C

    return C.cpu_info()["model"]
