"""Our checkpoint format: a directory of safetensors weights and JSON, nothing pickled.

    CKPT/ettin.json          {"format": "ettin-checkpoint", "version": 1, "model": {...config...},
                              "meta": {...step, tokens, origin...}}
    CKPT/model.safetensors   the weights (tied embedding stored once)
    CKPT/tokenizer/          optional: tokenizer.json (+ its config) the model was trained with
    CKPT/...                 room for trainer state (optimizer, data position, RNG) added by the trainer

Loading never executes code from the directory: safetensors and JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ettin.config import ModelConfig
from ettin.errors import EttinError
from ettin.fsutil import atomic_dir

FORMAT = "ettin-checkpoint"
VERSION = 1
META_FILE = "ettin.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META_FILE
    if not path.exists():
        raise EttinError(f"{path}: no such checkpoint")
    if not meta_path.is_file():
        raise EttinError(f"{path}: not an ettin checkpoint (no {META_FILE}; for a Hugging Face directory use 'ettin import')")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{meta_path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EttinError(f"{meta_path}: not an ettin checkpoint (format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if meta.get("version", 0) > VERSION:
        raise EttinError(f"{meta_path}: checkpoint version {meta['version']} is newer than this ettin supports ({VERSION})")
    return meta


def load_config(path: str | Path) -> ModelConfig:
    meta = read_meta(path)
    return ModelConfig.from_dict(meta.get("model"), source=str(Path(path) / META_FILE))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    wpath = Path(path) / WEIGHTS_FILE
    if not wpath.is_file():
        raise EttinError(f"{path}: checkpoint has no {WEIGHTS_FILE}")
    try:
        return load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EttinError(f"{wpath}: unreadable or truncated weights ({e})") from None


def load_model(path: str | Path, *, device: str | torch.device = "cpu"):
    """Build the model a checkpoint describes and load its weights (strictly)."""
    from ettin.model import Transformer

    config = load_config(path)
    state = load_state_dict(path)
    with torch.device("meta"):
        model = Transformer(config, init=False)
    check_finite(state, Path(path) / WEIGHTS_FILE)
    model = model.to_empty(device=device)
    _load_strict(model, state, path)
    return model.eval()  # inference mode (no dropout); the trainer switches to train() itself


def check_finite(state: dict, source) -> None:
    """Refuse weights holding NaN or Inf (a diverged run's checkpoint), naming the first tensor."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise EttinError(f"{source}: tensor '{k}' holds NaN or Inf values; refusing a diverged checkpoint (use an earlier one)")


def check_state_dict(state, want: dict, source, *, allow_missing: tuple[str, ...] = ()) -> None:
    """Keys and shapes of ``state`` against the state dict a config's model has."""
    missing = sorted(set(want) - set(state) - set(allow_missing))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise EttinError(f"{source}: weights do not match the config ({what})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise EttinError(f"{source}: tensor '{k}' has shape {tuple(v.shape)}, the config expects {tuple(want[k].shape)}")


def _load_strict(model, state: dict, path) -> None:
    check_state_dict(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True, assign=False)


def save_checkpoint(
    path: str | Path,
    model,
    *,
    meta: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    extra_writer=None,
    state: dict | None = None,
    config: ModelConfig | None = None,
) -> Path:
    """Write a complete checkpoint atomically. ``extra_writer(tmpdir)`` may add trainer state.

    ``state``/``config`` replace ``model.state_dict()``/``model.config`` (e.g. a full state dict
    gathered from a sharded model, with ``model`` then None).
    """
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else model.state_dict()).items()}
    config = config if config is not None else model.config
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        doc = {"format": FORMAT, "version": VERSION, "model": config.to_dict(), "meta": meta or {}}
        (tmp / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
        if extra_writer is not None:
            extra_writer(tmp)
    return path


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise EttinError(f"{src}: no tokenizer.json")
    from ettin.safety import copy_small_files

    copy_small_files(src, dst)  # a symlink out of the tokenizer directory is refused


def tokenizer_dir(path: str | Path) -> Path | None:
    d = Path(path) / TOKENIZER_DIR
    return d if (d / "tokenizer.json").is_file() else None
