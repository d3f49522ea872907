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
    import os

    from ettin.lock import run_lock
    from ettin.safety import check_parent
    from ettin.train.recipe import load_recipe

    out = Path(out)
    load_recipe(recipe, overrides)  # a bad recipe fails before anything is written
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise EttinError(f"{out}: exists and is a file; --out takes a run directory")
    created = not out.exists()
    try:
        with run_lock(out, enabled=int(os.environ.get("RANK", "0")) == 0):  # one writer, also for out/source
            path = resolve_source(source, out)
            cfg = ckpt.load_config(path)
            if cfg.objective == objective and not force:
                raise EttinError(f"{path}: the model is already trained with {objective} ({cfg.kind}); pass --force to continue anyway")
            if cfg.kind == KIND_FOR[objective]:
                import sys

                src = "a decoder" if objective == "mntp" else "an encoder"
                art = "an" if cfg.kind == "encoder" else "a"
                print(f"warning: {path} is {art} {cfg.kind}; --objective {objective} continues it as {art} {cfg.kind}, "
                      f"which is not a cross-objective conversion (that starts from {src})", file=sys.stderr)
            sets = [f"model.init_from={path}", f"train.objective={objective}", "model.load_optimizer=false"] + list(overrides or [])
            return train(recipe, out, overrides=sets, max_steps=max_steps, progress=progress, kind=KIND_FOR[objective])
    except BaseException:
        from ettin.lock import LOCK_FILE

        if created and out.is_dir() and all(p.name == LOCK_FILE for p in out.iterdir()):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
