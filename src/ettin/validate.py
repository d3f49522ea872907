"""Value checks done before any work starts: one line naming the key and the allowed range.

Upper bounds exist so an absurd value (``train.tokens=1e30``, a config with 10^12 hidden units)
fails at once instead of planning forever or allocating until the machine dies. They are far
above anything real (Ettin's largest run: 2T tokens, hidden 1792).
"""

from __future__ import annotations

import math
import re

from ettin.errors import EttinError

MAX_TOKENS = 10**15  # token budgets (a quadrillion; the paper's runs are ~2e12)
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 1 << 24  # sequences per step
MAX_SEED = 2**63 - 1
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 16  # hidden / intermediate
MAX_LAYERS = 1024
MAX_PARAMS = 10**12  # refused before any allocation
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _where(source, key: str) -> str:
    return f"{source}: '{key}'" if source else key


def check_int(key: str, value, lo: int, hi: int, source=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise EttinError(f"{_where(source, key)} must be an integer in [{lo:,}, {hi:,}], got {value!r}")
    return value


def check_float(key: str, value, lo: float, hi: float, source=None, *, lo_open=False, hi_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        hi_s = "inf" if hi == math.inf else f"{hi:g}"
        raise EttinError(f"{_where(source, key)} must be a finite number in {lb}{lo:g}, {hi_s}{rb}, got {value!r}")
    return float(value)


def check_stage_values(stage, source) -> None:
    """Ranges of every numeric recipe field (types were checked when the stage was built)."""
    t, o, s = stage.train, stage.optim, stage.optim.schedule
    inf = math.inf
    check_int("train.tokens", t.tokens, 1, MAX_TOKENS, source)
    check_int("train.seq_len", t.seq_len, 2, MAX_SEQ_LEN, source)
    check_float("train.mask_rate", t.mask_rate, 0.0, 1.0, source)
    check_float("train.rope_theta", t.rope_theta, 0.0, 1e12, source, lo_open=True)
    check_int("train.global_batch", t.global_batch, 1, MAX_BATCH, source)
    check_int("train.micro_batch", t.micro_batch, 1, MAX_BATCH, source)
    check_int("train.batch_warmup_tokens", t.batch_warmup_tokens, 0, MAX_TOKENS, source)
    check_int("train.batch_multiple", t.batch_multiple, 1, MAX_BATCH, source)
    check_int("train.seed", t.seed, 0, MAX_SEED, source)
    if t.max_steps is not None:
        check_int("train.max_steps", t.max_steps, 1, MAX_TOKENS, source)
    if not isinstance(t.device, str) or not _DEVICE.match(t.device):
        raise EttinError(f"{source}: 'train.device' must be auto, cpu, mps, cuda or cuda:N, got {t.device!r}")
    check_float("optim.lr", o.lr, 0.0, inf, source, lo_open=True)
    if not isinstance(o.betas, list) or len(o.betas) != 2:
        raise EttinError(f"{source}: 'optim.betas' must be a list of two numbers in [0, 1), got {o.betas!r}")
    for i, b in enumerate(o.betas):
        check_float(f"optim.betas[{i}]", b, 0.0, 1.0, source, hi_open=True)
    check_float("optim.eps", o.eps, 0.0, 1.0, source, lo_open=True)
    check_float("optim.weight_decay", o.weight_decay, 0.0, inf, source)
    if o.grad_clip is not None:
        check_float("optim.grad_clip", o.grad_clip, 0.0, inf, source, lo_open=True)
    check_int("optim.schedule.warmup_tokens", s.warmup_tokens, 0, MAX_TOKENS, source)
    check_float("optim.schedule.start_factor", s.start_factor, 0.0, 1e6, source)
    check_float("optim.schedule.end_factor", s.end_factor, 0.0, 1e6, source)
    if s.decay_tokens is not None:
        check_int("optim.schedule.decay_tokens", s.decay_tokens, 0, MAX_TOKENS, source)
    check_int("checkpoint.every_tokens", stage.checkpoint.every_tokens, 1, MAX_TOKENS, source)
    check_int("logging.every_steps", stage.logging.every_steps, 1, MAX_TOKENS, source)
    if stage.logging.peak_flops is not None:
        check_float("logging.peak_flops", stage.logging.peak_flops, 0.0, 1e21, source, lo_open=True)
    if not isinstance(stage.model.overrides, dict):
        raise EttinError(f"{source}: 'model.overrides' must be a mapping")
    fixed = sorted(set(stage.model.overrides) & {"layers", "hidden", "intermediate", "heads", "name", "causal"})
    if fixed:
        raise EttinError(f"{source}: 'model.overrides.{fixed[0]}' is set by model.size and model.kind; choose another size instead")
    for i, src in enumerate(stage.data.sources):
        if not isinstance(src, dict):
            continue  # the caller names it
        if not isinstance(src.get("path"), str) or not src.get("path"):
            raise EttinError(f"{source}: 'data.sources[{i}].path' must be a non-empty string, got {src.get('path')!r}")
        if "name" in src and not isinstance(src["name"], str):
            raise EttinError(f"{source}: 'data.sources[{i}].name' must be a string, got {src['name']!r}")
        if src.get("weight") is not None:
            check_float(f"data.sources[{i}].weight", src["weight"], 0.0, 1e12, source, lo_open=True)
        if src.get("epochs") is not None:
            check_float(f"data.sources[{i}].epochs", src["epochs"], 0.0, 1e6, source, lo_open=True)


def check_model_config(cfg, source="model config") -> None:
    """Absurd sizes refused before any allocation (ettin.json and HF config.json alike)."""
    for key, hi in (("layers", MAX_LAYERS), ("hidden", MAX_WIDTH), ("intermediate", MAX_WIDTH), ("heads", MAX_WIDTH),
                    ("vocab_size", MAX_VOCAB), ("max_seq_len", MAX_SEQ_LEN), ("global_every", MAX_LAYERS),
                    ("local_attention", MAX_SEQ_LEN)):
        check_int(key, getattr(cfg, key), 1, hi, source)
    for key in ("window_left", "window_right"):
        v = getattr(cfg, key)
        if v is not None:
            check_int(key, v, -1, MAX_SEQ_LEN, source)
    for key in ("rope_theta_global", "rope_theta_local"):
        check_float(key, getattr(cfg, key), 0.0, 1e12, source, lo_open=True)
    check_float("norm_eps", cfg.norm_eps, 0.0, 1.0, source, lo_open=True)
    check_float("init_std", cfg.init_std, 0.0, 10.0, source)
    check_float("init_cutoff", cfg.init_cutoff, 0.0, 1e3, source)
    for key in ("cls_id", "sep_id", "pad_id", "mask_id"):
        check_int(key, getattr(cfg, key), 0, cfg.vocab_size - 1, source)
    for key in ("name", "origin", "objective"):
        if not isinstance(getattr(cfg, key), str):
            raise EttinError(f"{source}: '{key}' must be a string, got {getattr(cfg, key)!r}")
    if not isinstance(cfg.causal, bool):
        raise EttinError(f"{source}: 'causal' must be true or false, got {cfg.causal!r}")
    if not isinstance(cfg.extra, dict):
        raise EttinError(f"{source}: 'extra' must be an object, got {cfg.extra!r}")
    n = cfg.num_params()
    if n > MAX_PARAMS:
        raise EttinError(f"{source}: {n:,} parameters exceed the limit of {MAX_PARAMS:,} (an absurd size?)")
