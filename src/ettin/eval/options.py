"""Evaluation settings: one dataclass, defaults sane for a CPU (override anything for a GPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ettin.errors import EttinError


ENCODER_SCORINGS = ("ltr", "pll")


@dataclass
class EvalOptions:
    # scoring
    batch_size: int = 32  # sequences per forward pass (masked scoring: masked variants per pass)
    device: str = "cpu"
    limit: int | None = None  # examples per task (also caps fine-tuning train examples / pairs)
    max_length: int = 1024  # longest scored sequence; longer contexts are cut from the left
    bos: bool = True  # prepend [CLS] (our BOS) to every decoder context, as documents start with it
    # encoders on generative tasks (multiple choice, LAMBADA): "ltr" = the Ettin authors' scoring
    # (left to right, token k at the first of three [MASK]s + [SEP]); "pll" = pseudo-log-likelihood
    # (each continuation token masked in turn, everything else visible; LAMBADA: the word masked jointly)
    encoder_scoring: str = "ltr"
    winogender: str = "gotcha"  # "gotcha" (the authors' probe) | "all" (every sentence, with breakdowns)
    # perplexity
    lm_window: int = 1024  # decoder rolling window (tokens scored per window <= this)
    lm_stride: int | None = None  # None: disjoint windows (lm-evaluation-harness rolling); smaller: sliding
    pll_window: int = 256  # encoder pseudo-perplexity: text is cut into chunks of this many tokens
    # generation
    max_new_tokens: int = 32
    # fine-tuning (GLUE, retrieval)
    finetune: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    epochs: int = 3
    train_batch_size: int = 16
    glue_max_length: int = 128
    carve_out: float = 0.1  # share of train held out to pick the learning rate
    encoder_pooling: str = "mean"  # "mean" | "cls"
    decoder_pooling: str = "last"  # "last" | "mean"
    pooling: str | None = None  # "mean" | "cls" | "last": overrides the per-side pooling (GLUE and retrieval)
    retrieval_lr: float = 1e-4
    retrieval_epochs: int = 1
    retrieval_batch_size: int = 32
    retrieval_temperature: float = 0.05
    query_max_length: int = 64
    doc_max_length: int = 256
    progress: bool = False

    def replace(self, **changes) -> "EvalOptions":
        names = {f.name for f in dataclasses.fields(self)}
        for k in changes:
            if k not in names:
                raise EttinError(f"unknown evaluation option '{k}' (known: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **{k: v for k, v in changes.items()})

    def validate(self) -> "EvalOptions":
        for key in ("batch_size", "max_length", "lm_window", "pll_window", "epochs", "train_batch_size",
                    "glue_max_length", "retrieval_batch_size", "query_max_length", "doc_max_length"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise EttinError(f"evaluation option {key} must be a positive integer, got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise EttinError(f"--limit must be a positive integer, got {self.limit!r}")
        if self.lm_stride is not None and not (0 < self.lm_stride <= self.lm_window):
            raise EttinError(f"lm_stride must lie in 1..lm_window ({self.lm_window}), got {self.lm_stride}")
        if self.encoder_scoring not in ENCODER_SCORINGS:
            raise EttinError(f"--encoder-scoring must be one of {', '.join(ENCODER_SCORINGS)}, got '{self.encoder_scoring}'")
        if self.winogender not in ("gotcha", "all"):
            raise EttinError(f"--winogender must be 'gotcha' or 'all', got '{self.winogender}'")
        if self.encoder_pooling not in ("mean", "cls"):
            raise EttinError(f"encoder pooling must be 'mean' or 'cls', got '{self.encoder_pooling}'")
        if self.pooling is not None and self.pooling not in ("mean", "cls", "last"):
            raise EttinError(f"--pooling must be 'mean', 'cls' or 'last', got '{self.pooling}'")
        if self.decoder_pooling not in ("last", "mean"):
            raise EttinError(f"decoder pooling must be 'last' or 'mean', got '{self.decoder_pooling}'")
        if not self.seeds:
            raise EttinError("give at least one seed")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise EttinError(f"learning rates must be positive, got {self.lrs}")
        if not 0 < self.carve_out < 1:
            raise EttinError(f"carve_out must lie in (0, 1), got {self.carve_out}")
        return self
