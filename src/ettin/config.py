"""Model configuration: one frozen dataclass, named size presets, exact parameter counts.

The six Ettin sizes are fixed by the paper (SPEC section 2); ``tiny`` and ``micro`` exist so
tests and the demo run in seconds on a CPU. Encoder and decoder share every field but
``causal`` (and the objective that follows from it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field

from ettin.errors import EttinError

# ModernBERT's tokenizer, padded to a multiple of 64, and its special ids.
MODERNBERT_VOCAB = 50368
MODERNBERT_SPECIALS = {"cls_id": 50281, "sep_id": 50282, "pad_id": 50283, "mask_id": 50284}

OBJECTIVES = ("mlm", "clm", "mntp")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the network; saved as JSON beside the weights."""

    layers: int
    hidden: int
    intermediate: int  # per GeGLU branch
    heads: int
    vocab_size: int = MODERNBERT_VOCAB
    name: str = "custom"
    causal: bool = False
    # What the model is trained for; "mntp" is a bidirectional model whose output at i-1
    # predicts the token at i (LLM2Vec), so masked scoring must read the shifted position.
    objective: str = ""
    # "native", or a description of the checkpoint this one was converted from.
    origin: str = "native"
    global_every: int = 3
    local_attention: int = 128
    # Sliding-window bounds (keys j visible to query i satisfy i-left <= j <= i+right).
    # None means "as transformers 5.x does": encoder (64, 64), decoder (63, 0).
    window_left: int | None = None
    window_right: int | None = None
    rope_theta_global: float = 10_000.0
    rope_theta_local: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_cutoff: float = 2.0
    # Dropout on each block's attention output projection, in training mode only (Ettin trains
    # with 0.1, ModernBERT's attn_out_dropout_prob); the model has no other dropout.
    attn_out_dropout: float = 0.0
    max_seq_len: int = 8192
    cls_id: int = MODERNBERT_SPECIALS["cls_id"]
    sep_id: int = MODERNBERT_SPECIALS["sep_id"]
    pad_id: int = MODERNBERT_SPECIALS["pad_id"]
    mask_id: int = MODERNBERT_SPECIALS["mask_id"]
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.objective:
            object.__setattr__(self, "objective", "clm" if self.causal else "mlm")
        self.validate()

    # -- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_encoder(self) -> bool:
        return not self.causal

    @property
    def kind(self) -> str:
        return "decoder" if self.causal else "encoder"

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.cls_id, self.sep_id, self.pad_id, self.mask_id)

    def is_global_layer(self, i: int) -> bool:
        return i % self.global_every == 0

    def window(self) -> tuple[int, int]:
        """(left, right) reach of a local layer, matching transformers unless overridden."""
        half = self.local_attention // 2
        if self.causal:
            left, right = half - 1, 0
        else:
            left, right = half, half
        if self.window_left is not None:
            left = self.window_left
        if self.window_right is not None:
            right = self.window_right
        if self.causal:
            right = 0
        return left, right

    def num_params(self) -> int:
        """Exact parameter count of :class:`ettin.model.Transformer` (tied embedding counted once)."""
        h, i, v, n = self.hidden, self.intermediate, self.vocab_size, self.layers
        per_layer = 3 * h * h + h * h + h * 2 * i + i * h + 2 * h  # qkv, out, Wi, Wo, 2 norms
        return v * h + h + n * per_layer - h + h + h * h + h + v  # emb, emb norm, -layer0 attn norm, final norm, head, bias

    # -- validation & serialisation --------------------------------------------------------
    def validate(self) -> None:
        def bad(key: str, msg: str) -> EttinError:
            return EttinError(f"model config: '{key}' {msg}")

        for key in ("layers", "hidden", "intermediate", "heads", "vocab_size", "global_every", "local_attention"):
            val = getattr(self, key)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise bad(key, f"must be a positive integer, got {val!r}")
        from ettin.validate import check_model_config

        check_model_config(self)  # types of every field and upper bounds (absurd sizes)
        if self.hidden % self.heads:
            raise bad("heads", f"must divide hidden={self.hidden}, got {self.heads}")
        if self.head_dim % 2:
            raise bad("heads", f"head dim {self.head_dim} must be even for RoPE")
        p = self.attn_out_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise bad("attn_out_dropout", f"must be a probability in [0, 1), got {p!r}")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "clm" and not self.causal:
            raise bad("objective", "'clm' needs causal=true")
        if self.objective in ("mlm", "mntp") and self.causal:
            raise bad("objective", f"'{self.objective}' needs causal=false")
        for key in ("cls_id", "sep_id", "pad_id", "mask_id"):
            val = getattr(self, key)
            if not (0 <= val < self.vocab_size):
                raise bad(key, f"= {val} lies outside the vocabulary of {self.vocab_size} tokens")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise EttinError(f"{source}: expected a JSON object for the model config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise EttinError(f"{source}: unknown model config key '{k}'{hint}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name in ("layers", "hidden", "intermediate", "heads") and f.name not in data]
        if missing:
            raise EttinError(f"{source}: model config lacks required key '{missing[0]}'")
        try:
            return cls(**data)
        except EttinError as e:
            raise EttinError(f"{source}: {e}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# name -> (layers, hidden, intermediate, heads, peak lr); SPEC section 2.
_SIZES = {
    "17m": (7, 256, 384, 4, 3e-3),
    "32m": (10, 384, 576, 6, 3e-3),
    "68m": (19, 512, 768, 8, 3e-3),
    "150m": (22, 768, 1152, 12, 8e-4),
    "400m": (28, 1024, 2624, 16, 5e-4),
    "1b": (28, 1792, 3840, 28, 5e-4),
}
# Test/demo sizes: a small vocabulary is given at build time (the tokenizer decides it).
_SMALL = {
    "tiny": (3, 64, 96, 2, 3e-3),
    "micro": (2, 32, 48, 2, 3e-3),
}

PAPER_SIZES = tuple(_SIZES)
PRESET_NAMES = tuple(_SIZES) + tuple(_SMALL)

# Exact counts from SPEC section 2 (vocabulary 50,368); a test checks num_params() against them.
PAPER_PARAMS = {
    "17m": 16_913_600,
    "32m": 32_081_344,
    "68m": 68_457_664,
    "150m": 149_655_232,
    "400m": 395_881_664,
    "1b": 1_031_314_112,
}

# Batch-size warmup tokens by size (SPEC section 4).
BATCH_WARMUP_TOKENS = {"17m": 125e9, "32m": 100e9, "68m": 75e9, "150m": 50e9, "400m": 10e9, "1b": 3e9}
# Weight decay and LR warmup tokens by size (SPEC section 4; every stage keeps the size's decay).
WEIGHT_DECAY = {"17m": 3e-4, "32m": 3e-4, "68m": 3e-4, "150m": 1e-5, "400m": 1e-5, "1b": 5e-5}
LR_WARMUP_TOKENS = {"17m": 4e9, "32m": 4e9, "68m": 3e9, "150m": 3e9, "400m": 2e9, "1b": 2e9}
# Cross-objective training by size: (LR, warmup tokens, final linear decay tokens, tokens).
CROSS_OBJECTIVE = {
    **{s: (1.5e-3, 3e9, 10e9, 50e9) for s in ("17m", "32m", "68m")},
    "150m": (4e-4, 3e9, 10e9, 50e9),
    "400m": (2.5e-4, 3e9, 10e9, 50e9),
    "1b": (2.5e-4, 1e9, 3.33e9, 16.7e9),
}


def peak_lr(name: str) -> float:
    return {**_SIZES, **_SMALL}[check_size(name)][4]


def check_size(name: str) -> str:
    if name not in _SIZES and name not in _SMALL:
        raise EttinError(f"unknown size '{name}': valid sizes are {', '.join(PRESET_NAMES)}")
    return name


def preset(name: str, *, causal: bool = False, **overrides) -> ModelConfig:
    """A named size; ``overrides`` (vocab_size, special ids, thetas...) replace defaults."""
    layers, hidden, inter, heads, _ = {**_SIZES, **_SMALL}[check_size(name)]
    return ModelConfig(layers=layers, hidden=hidden, intermediate=inter, heads=heads, name=name, causal=causal, **overrides)


def small_vocab_specials(vocab_size: int) -> dict:
    """Special ids for a test vocabulary: the first four ids, as our tokenizers lay them out."""
    return {"cls_id": 0, "sep_id": 1, "pad_id": 2, "mask_id": 3, "vocab_size": vocab_size}


def sizes_table() -> list[dict]:
    rows = []
    for name in PRESET_NAMES:
        cfg = preset(name)
        rows.append(
            {
                "name": name,
                "layers": cfg.layers,
                "hidden": cfg.hidden,
                "intermediate": cfg.intermediate,
                "heads": cfg.heads,
                "head_dim": cfg.head_dim,
                "vocab_size": cfg.vocab_size,
                "params": cfg.num_params(),
                "peak_lr": peak_lr(name),
                "paper": name in _SIZES,
            }
        )
    return rows
