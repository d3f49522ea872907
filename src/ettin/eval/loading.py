"""What can be evaluated: our checkpoints, run directories (trajectories), pairs, HF directories.

:func:`load_for_eval` turns a path into a list of :class:`EvalModel` (one per checkpoint, sorted
by step; encoder side first for a pair). Weights load lazily, so a long trajectory holds one
model in memory at a time (call :meth:`EvalModel.release` when done with one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ettin.config import ModelConfig
from ettin.errors import EttinError
from ettin.resolve import run_checkpoints


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EttinError(f"--device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EttinError("--device cuda: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise EttinError(f"--device must be 'cpu' or 'cuda', got '{device}'")
    return dev


class Tok:
    """The few things evaluation needs from a tokenizer (ids never include special tokens)."""

    def __init__(self, tokenizer):
        if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy without truncation/padding
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self.raw = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.raw.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=True)


def load_tokenizer_file(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a directory with tokenizer.json (or the file itself)."""
    path = Path(path)
    try:
        from ettin.data.tokenizer import load_tokenizer

        return load_tokenizer(path)
    except ImportError:  # pragma: no cover - the data package is part of ettin
        pass
    from tokenizers import Tokenizer

    f = path if path.is_file() else path / "tokenizer.json"
    if not f.is_file():
        raise EttinError(f"{path}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise EttinError(f"{f}: not a valid tokenizers file ({e})") from None


@dataclass
class EvalModel:
    """One model to evaluate: the Transformer (lazy), its tokenizer, config and provenance."""

    name: str
    config: ModelConfig
    path: Path | None = None
    step: int | None = None
    tokens: int | float | None = None
    run_dir: Path | None = None  # set when the model came from a run directory (eval.jsonl goes there)
    device: str = "cpu"
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)  # per-model results of expensive steps (fine-tuned copies)
    _model: object = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)
    _load_model: Callable | None = field(default=None, repr=False)
    _load_tokenizer: Callable | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def objective(self) -> str:
        return self.config.objective

    @property
    def origin(self) -> str:
        return self.config.origin

    @property
    def is_encoder(self) -> bool:
        return not self.config.causal

    @property
    def model(self):
        if self._model is None:
            if self._load_model is None:
                raise EttinError(f"{self.name}: no model to load")
            self._model = self._load_model()
        m = self._model
        dev = torch.device(self.device)
        if next(m.parameters()).device != dev:
            m.to(dev)
        m.eval()
        return m

    @property
    def tokenizer(self) -> Tok:
        if self._tokenizer is None:
            if self._load_tokenizer is None:
                raise EttinError(f"{self.name}: no tokenizer")
            self._tokenizer = self._load_tokenizer()
        if not isinstance(self._tokenizer, Tok):
            self._tokenizer = Tok(self._tokenizer)
        return self._tokenizer

    def release(self) -> None:
        """Drop the weights (they reload on next use)."""
        self.cache.clear()
        if self._load_model is not None:
            self._model = None

    @classmethod
    def from_model(cls, model, tokenizer, *, name: str = "model", step=None, tokens=None, device: str | None = None,
                   path: str | Path | None = None) -> "EvalModel":
        """Wrap an in-memory :class:`ettin.model.Transformer`; ``tokenizer`` is a
        ``tokenizers.Tokenizer`` or a directory/file holding tokenizer.json."""
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer_file(tokenizer)
        if device is None:
            device = str(next(model.parameters()).device)
        return cls(name=name, config=model.config, step=step, tokens=tokens, device=device,
                   path=Path(path) if path else None, _model=model, _tokenizer=tokenizer)


# -- discovering models ----------------------------------------------------------------------
def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def _checkpoint_model(ckpt: Path, device: str, run_dir: Path | None) -> EvalModel:
    from ettin.checkpoint import load_config, load_model, read_meta, tokenizer_dir

    meta = read_meta(ckpt).get("meta") or {}
    config = load_config(ckpt)
    tdir = tokenizer_dir(ckpt)
    if tdir is None and run_dir is not None:  # a trainer may keep one tokenizer per run
        for cand in [run_dir / "tokenizer", *(c / "tokenizer" for c in run_checkpoints(run_dir))]:
            if (cand / "tokenizer.json").is_file():
                tdir = cand
                break
    if tdir is None:
        raise EttinError(f"{ckpt}: checkpoint has no tokenizer (expected {ckpt / 'tokenizer' / 'tokenizer.json'}); "
                         "evaluation needs the tokenizer the model was trained with")
    step = meta.get("step")
    tokens = meta.get("tokens")
    return EvalModel(
        name=str(ckpt), config=config, path=ckpt, step=step if isinstance(step, int) else None,
        tokens=tokens if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) else None,
        run_dir=run_dir, device=device, meta=meta,
        _load_model=lambda: load_model(ckpt, device="cpu"), _load_tokenizer=lambda: load_tokenizer_file(tdir),
    )


def _hf_model(path: Path, device: str) -> EvalModel:
    try:
        from ettin.convert.hf import load_hf_as_model
    except ImportError as e:  # pragma: no cover - convert ships with ettin
        raise EttinError(f"{path}: Hugging Face import is not available ({e})") from None
    if not (path / "tokenizer.json").is_file():
        raise EttinError(f"{path}: Hugging Face directory has no tokenizer.json (evaluation needs the tokenizer)")
    model = load_hf_as_model(path)
    meta = {}
    try:
        block = json.loads((path / "config.json").read_text()).get("ettin") or {}
        meta = block.get("meta") or {} if isinstance(block, dict) else {}
    except (OSError, ValueError, AttributeError):
        meta = {}
    step, tokens = meta.get("step"), meta.get("tokens")
    return EvalModel(
        name=str(path), config=model.config, path=path, device=device, meta=meta,
        step=step if isinstance(step, int) else None,
        tokens=tokens if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) else None,
        _model=model, _load_tokenizer=lambda: load_tokenizer_file(path),
    )


def load_for_eval(path: str | Path, device: str = "cpu") -> list[EvalModel]:
    """Every model ``path`` names: a checkpoint, a run directory (each checkpoint, by step), a
    pair run (encoder then decoder), a directory of runs, a Hugging Face directory or a Hub id
    (classified by :func:`ettin.resolve.resolve_model`)."""
    from ettin.resolve import resolve_model

    device = str(check_device(device))
    r = resolve_model(path)
    if r.kind == "checkpoint":
        return [_checkpoint_model(r.path, device, None)]
    if r.kind == "hf":
        em = _hf_model(r.path, device)
        if r.hub_id:
            em.name = r.hub_id
        return [em]
    if r.kind == "run":
        return [_checkpoint_model(c, device, r.path) for c in r.checkpoints]
    # a pair run (encoder/, decoder/) or any directory of run directories (a demo directory)
    out: list[EvalModel] = []
    for d in r.runs:
        out.extend(_checkpoint_model(c, device, d) for c in run_checkpoints(d))
    if out:
        return out
    raise EttinError(f"{r.path}: the runs below it ({', '.join(str(x) for x in r.runs[:4])}) have no checkpoints yet")
