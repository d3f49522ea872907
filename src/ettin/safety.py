"""Guards for what a command may write, copy or read: nothing lost, nothing read from outside.

* :func:`check_out` decides whether ``--out`` may be (re)written: a new path or an empty
  directory always; an earlier output of the same command (``ours``) always; anything else that
  holds files only with ``--force``; a file, or a training run (or a checkpoint inside one),
  never, not even with ``--force``.
* :func:`copy_small_files` copies a tokenizer-like directory without following a symlink that
  leads out of it.
* :func:`inside` resolves an untrusted relative name inside a directory or refuses it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ettin.errors import EttinError


def is_run_dir(path: Path) -> bool:
    """A training run (single or pair), or a checkpoint inside one's ``checkpoints/``."""
    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return True
    if (path / "encoder" / "recipe.yaml").is_file() or (path / "decoder" / "recipe.yaml").is_file():
        return True
    if path.name == "checkpoints" or path.parent.name == "checkpoints":
        run = path.parent if path.name == "checkpoints" else path.parent.parent
        return (run / "recipe.yaml").is_file() or (run / "metrics.jsonl").is_file()
    return False


def check_parent(out: Path) -> None:
    """One line when ``out`` cannot be created: a parent is a file."""
    for p in Path(out).absolute().parents:
        if p.exists():
            if not p.is_dir():
                raise EttinError(f"{out}: cannot be created, {p} is a file, not a directory")
            return


def check_out(out: str | os.PathLike, *, force: bool, ours: bool, what: str = "output directory",
              inputs: tuple = ()) -> None:
    """Refuse an ``--out`` whose current content would be lost (see the module docstring)."""
    out = Path(out)
    check_parent(out)
    for src in inputs:
        src = Path(src)
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise EttinError(f"{out}: --out is the input; choose another")
    if out.is_symlink() and not out.exists():
        raise EttinError(f"{out}: is a dangling symbolic link; refusing to write through it")
    if not out.exists():
        return
    if not out.is_dir():
        raise EttinError(f"{out}: exists and is a file, not a {what}; refusing to replace it (remove it yourself or choose another --out)")
    if is_run_dir(out):
        raise EttinError(f"{out}: is a training run (or a checkpoint of one); refusing to replace it even with --force")
    try:
        empty = not any(out.iterdir())
    except PermissionError:
        raise EttinError(f"{out}: cannot be read (permission denied)") from None
    if empty or ours:
        return
    if not force:
        raise EttinError(f"{out}: exists, is not empty and is not an earlier {what} of this command; pass --force to replace it")


def inside(root: Path, name, what: str, source) -> Path:
    """``root / name`` for an untrusted ``name``: relative, no '..', and not a symlink leading out."""
    if not isinstance(name, str) or not name:
        raise EttinError(f"{source}: {what} must be a file name, got {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise EttinError(f"{source}: {what} {name!r} lies outside {root} (only plain relative names are allowed)")
    full = root / p
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise EttinError(f"{source}: {what} {name!r} resolves outside {root} (a symbolic link out of the directory)") from None
    return full


def copy_small_files(src: Path, dst: Path, suffixes=(".json", ".txt", ".model"), names=None) -> None:
    """Copy the files of ``src`` (by suffix or name) into ``dst``; a symlink out of ``src`` is refused."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    root = src.resolve()
    for f in sorted(src.iterdir()):
        if names is not None and f.name not in names:
            continue
        if names is None and f.suffix not in suffixes:
            continue
        if not f.is_file():
            continue
        if f.is_symlink():
            try:
                f.resolve().relative_to(root)
            except ValueError:
                raise EttinError(f"{f}: is a symbolic link out of {src}; refusing to copy it") from None
        shutil.copyfile(f, dst / f.name)
