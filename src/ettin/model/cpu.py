"""CPU-specific kernel choices: what the processor is, and which matrix-product path is faster on it.

PyTorch's CPU linear layers call the BLAS it was built with (MKL's sgemm). oneDNN's JIT kernels
(the ones torch.compile's CPU backend uses, reachable eagerly as
``torch.ops.mkldnn._linear_pointwise``) are about twice as fast at our shapes on an AMD Zen 5,
where MKL takes a slow generic path, and about as fast as MKL on an Intel Xeon. Neither wins
everywhere, so the choice is *measured*: a short probe (~0.2 s) times the three products of one
representative linear layer both ways at the current thread count, and the winner is cached per
machine in ``~/.cache/ettin/cpu_kernels.json`` (keyed by CPU model, torch version and threads).

``ETTIN_LINEAR=onednn|aten`` forces a choice (``ETTIN_ONEDNN=0`` is the older spelling of
``aten``); ``ETTIN_LINEAR=probe`` (the default) measures once and then reads the cache.
Both paths compute the same fp32 products (another summation order; ``tests/test_perf_equivalence.py``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

LINEAR_PATHS = ("onednn", "aten")
# ISA features that decide CPU kernel speed (names as /proc/cpuinfo spells them)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# -- what the processor is ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model, vendor, family/model numbers, logical CPUs and the ISA flags of :data:`ISA_FLAGS` it has."""
    info = {"model": None, "vendor": None, "family": None, "model_id": None, "flags": [], "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "model name" and info["model"] is None:
                    info["model"] = val
                elif key == "vendor_id" and info["vendor"] is None:
                    info["vendor"] = val
                elif key == "cpu family" and info["family"] is None:
                    info["family"] = int(val)
                elif key == "model" and info["model_id"] is None:
                    info["model_id"] = int(val)
                elif key == "flags" and not info["flags"]:
                    have = set(val.split())
                    info["flags"] = [f for f in ISA_FLAGS if f in have]
                elif not line.strip() and info["model"] is not None:
                    break  # first processor's block is enough
    except OSError:  # not Linux: name only
        info["model"] = platform.processor() or platform.machine() or "unknown"
    if info["model"] is None:
        info["model"] = platform.processor() or platform.machine() or "unknown"
    return info


def bf16_supported() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): bf16 autocast is faster there, not slower."""
    flags = set(cpu_info()["flags"])
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# -- glibc allocator ----------------------------------------------------------------------------
_MALLOC_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensors up to 32 MB in glibc's heap instead of returning them to the OS.

    glibc serves large allocations with mmap and gives them back on free, so each training step
    page-faults its activations in afresh (tens of thousands of faults, ~7% of a 17m CPU step).
    With a fixed 32 MB mmap threshold (glibc's maximum) and no heap trimming, the blocks are
    reused. Vendor-independent (page faults cost the same everywhere). Process-wide and
    idempotent; glibc/Linux only; ETTIN_MALLOPT=0 turns it off.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    _MALLOC_TUNED = True
    if os.environ.get("ETTIN_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)
    except Exception:  # not glibc
        return False


# -- oneDNN linear layers ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def onednn_works() -> bool:
    """oneDNN's linear op exists in this torch build and computes ``x @ w.T + b``."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)  # not the global RNG: the check must not move dropout's stream
        x, w, b = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, torch.addmm(b, x, w.t()), atol=1e-5))
    except Exception:  # pragma: no cover - torch without oneDNN
        return False


def _onednn(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` with all three products through oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        N, K = w.shape
        g2 = g.reshape(-1, N)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(g2, w.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, K)
            if N >= K:  # transpose the smaller operand: dW^T = x^T g
                gw = _onednn(x2.t().contiguous(), g2.t()).t().contiguous()
            else:
                gw = _onednn(g2.t().contiguous(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


# -- the measured choice ------------------------------------------------------------------------
def cache_path() -> Path:
    base = os.environ.get("ETTIN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ettin")
    return Path(base) / "cpu_kernels.json"


def machine_key(threads: int | None = None) -> str:
    """What a measured choice is valid for: this CPU model, this torch, this many threads."""
    return f"{cpu_info()['model']}|torch {torch.__version__}|threads {threads or torch.get_num_threads()}"


def _time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe_linear(rows: int = 2048, hidden: int = 256, out: int = 768, reps: int = 5) -> dict:
    """Time one linear layer's forward + backward products through oneDNN and through aten (MKL).

    Shapes are a 17m block's QKV projection on 2048 tokens; the two paths alternate, the best
    of ``reps`` counts (background load slows a run, never speeds it up). Returns the seconds
    of each and the winner: oneDNN only when it is at least 10% faster (aten is the default).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w = torch.randn(out, hidden, generator=g) * 0.05
    go = torch.randn(rows, out, generator=g)

    def aten():
        F.linear(x, w)
        go.mm(w)
        go.t().mm(x)

    def onednn():
        _onednn(x, w)
        _onednn(go, w.t())
        _onednn(x.t().contiguous(), go.t())

    aten(), onednn()  # warm: JIT kernels and thread pools
    ta = to = float("inf")
    for _ in range(reps):
        ta = min(ta, _time(aten, 1))
        to = min(to, _time(onednn, 1))
    return {"aten_s": round(ta, 6), "onednn_s": round(to, 6), "choice": "onednn" if to < 0.9 * ta else "aten"}


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, rec: dict) -> None:
    """Best effort (a read-only home only costs a probe per process); written by rename."""
    try:
        p = cache_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = rec
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, p)
    except OSError:
        pass


_CHOICE: dict[int, dict] = {}  # threads -> {"linear": ..., "source": ...}


def linear_choice(threads: int | None = None) -> dict:
    """``{"linear": "onednn"|"aten", "source": "env"|"cache"|"probe"|"unavailable", ...}`` for this process."""
    threads = threads or torch.get_num_threads()
    got = _CHOICE.get(threads)
    if got is not None:
        return got
    forced = os.environ.get("ETTIN_LINEAR", "probe").lower()
    if os.environ.get("ETTIN_ONEDNN") == "0":
        forced = "aten"
    if forced not in LINEAR_PATHS + ("probe",):
        from ettin.errors import EttinError

        raise EttinError(f"ETTIN_LINEAR={forced}: expected one of onednn, aten, probe")
    if forced == "aten":
        got = {"linear": "aten", "source": "env"}
    elif not onednn_works():
        got = {"linear": "aten", "source": "unavailable"}
    elif forced == "onednn":
        got = {"linear": "onednn", "source": "env"}
    else:
        key = machine_key(threads)
        rec = _read_cache().get(key)
        if rec is not None and rec.get("choice") in LINEAR_PATHS:
            got = {"linear": rec["choice"], "source": "cache", **{k: v for k, v in rec.items() if k != "choice"}}
        else:
            with torch.no_grad():
                rec = probe_linear()
            _write_cache(key, rec)
            got = {"linear": rec["choice"], "source": "probe", **{k: v for k, v in rec.items() if k != "choice"}}
    _CHOICE[threads] = got
    return got


def reset_choice() -> None:
    """Forget this process's choice (tests; after changing ETTIN_LINEAR)."""
    _CHOICE.clear()


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """fp32 on a CPU, eager, outside autocast, and the probe (or ETTIN_LINEAR) picked oneDNN."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and type(x) in (torch.Tensor, nn.Parameter)
        and type(w) in (torch.Tensor, nn.Parameter)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and linear_choice()["linear"] == "onednn"
    )


def mm_nt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)`` without autograd, through the chosen path."""
    if use_onednn(x, w):
        return _onednn(x, w, b)
    return F.linear(x, w, b)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``, through oneDNN where the measured choice says so (fp32 CPU only)."""
    if use_onednn(x, w) and (b is None or b.dtype == torch.float32):
        return _OneDNNLinear.apply(x, w, b)
    return F.linear(x, w, b)


def describe() -> dict:
    """The CPU kernel choices in force (for benchmark records)."""
    c = linear_choice()
    return {"linear": c["linear"], "linear_source": c["source"],
            **({"probe_aten_s": c["aten_s"], "probe_onednn_s": c["onednn_s"]} if "aten_s" in c else {}),
            "malloc_tuned": _MALLOC_TUNED and os.environ.get("ETTIN_MALLOPT", "1") != "0"}


# -- inference precision ----------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str | None, device) -> str:
    """The precision to run inference in: ``fp32`` or ``bf16`` (autocast); None = the device's default
    (bf16 on a GPU, fp32 on a CPU).

    bf16 on a CPU only where the CPU computes it natively (AVX512-BF16 or AMX-BF16): elsewhere
    PyTorch emulates it, slower than fp32 and less accurate, so we refuse with one line rather
    than run a slower, worse computation (``ETTIN_ALLOW_BF16=1`` runs it anyway, for tests).
    """
    from ettin.errors import EttinError

    dev = torch.device(device)
    if precision is None:
        return "bf16" if dev.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise EttinError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and dev.type == "cpu" and not bf16_supported() and os.environ.get("ETTIN_ALLOW_BF16") != "1":
        raise EttinError(f"--precision bf16: this CPU ({cpu_info()['model']}) has neither AVX512-BF16 nor AMX-BF16, "
                         "so bf16 would run slower than fp32; use --precision fp32")
    return precision


def precision_context(precision: str, device):
    """Autocast to bf16 for ``bf16`` (products in bf16, softmax/norms as autocast keeps them), nothing for fp32."""
    import contextlib

    dev = torch.device(device)
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return torch.autocast(dev.type, enabled=False) if dev.type in ("cpu", "cuda") else contextlib.nullcontext()
