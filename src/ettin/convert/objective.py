"""Cross-objective continued training: encoder-from-decoder (MNTP) and decoder-from-encoder (CLM).

Weights only are taken from the finished model; the attention direction is switched (MNTP is
bidirectional, CLM causal); optimiser and schedule start fresh from the given recipe. The rest
is the ordinary trainer, so checkpoints, resume, torchrun and metrics all work the same.
"""

from __future__ import annotations

from pathlib import Path

from ettin import checkpoint as ckpt
from ettin.errors import EttinError

KIND_FOR = {"mntp": "encoder", "clm": "decoder", "mlm": "encoder"}


def resolve_source(source: Path, out: Path) -> Path:
    """Our checkpoint (or a run's last one) as is; a Hugging Face directory or Hub id is imported
    first (into OUT/source); a pair run is refused with the side to choose."""
    from ettin.resolve import single_model

    r = single_model(source, "convert")
    if r.kind == "checkpoint":
        return r.path
    from ettin.convert.hf import import_hf

    dest = Path(out) / "source"
    if not ckpt.is_checkpoint(dest):
        import_hf(r.hub_id or r.path, dest)
    return dest


def convert(
    source: Path,
    objective: str,
    recipe: Path,
    out: Path,
    *,
    force: bool = False,
    overrides: list[str] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    from ettin.train.trainer import train

    if objective not in ("mntp", "clm"):
        raise EttinError(f"--objective must be 'mntp' or 'clm', got '{objective}'")
    out = Path(out)
    path = resolve_source(source, out)
    cfg = ckpt.load_config(path)
    if cfg.objective == objective and not force:
        raise EttinError(f"{path}: the model is already trained with {objective} ({cfg.kind}); pass --force to continue anyway")
    if cfg.kind == KIND_FOR[objective]:
        import sys

        src = "a decoder" if objective == "mntp" else "an encoder"
        print(f"warning: {path} is {'an' if cfg.kind == 'encoder' else 'a'} {cfg.kind}; --objective {objective} continues it as "
              f"{'an' if cfg.kind == 'encoder' else 'a'} {cfg.kind}, which is not a cross-objective conversion (that starts from {src})",
              file=sys.stderr)
    sets = [f"model.init_from={path}", f"train.objective={objective}", "model.load_optimizer=false"] + list(overrides or [])
    return train(recipe, out, overrides=sets, max_steps=max_steps, progress=progress, kind=KIND_FOR[objective])
