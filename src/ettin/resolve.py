"""What a model argument names, for every command that takes one (eval, embed, export, convert,
import): one place, so each command accepts what the others accept.

    resolve_model("runs/pair/encoder")            -> Resolved(kind="run", path=..., checkpoints=[...])
    resolve_model("jhu-clsp/ettin-encoder-150m")  -> Resolved(kind="hf", path=<HF cache snapshot>, hub_id=...)
    single_model("runs/pair", command="export")   -> EttinError: ... use runs/pair/encoder or runs/pair/decoder

Kinds: ``checkpoint`` (ettin.json), ``run`` (checkpoints/<step>/), ``pair`` (encoder/ and decoder/
runs), ``runs`` (a directory holding runs, e.g. a demo output), ``hf`` (config.json: a local
transformers directory or a Hub snapshot). A Hub id (``ORG/NAME``, optionally ``@REVISION``) that is
not a local path is fetched with ``huggingface_hub.snapshot_download`` into the Hugging Face cache
(config, tokenizer and weight files only); with ``HF_HUB_OFFLINE=1`` only the cache is read.
Importing this module is cheap (no torch).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ettin.errors import EttinError

CHECKPOINTS_DIR = "checkpoints"
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
# Files a model needs (top level only): config, tokenizer, weights (safetensors first).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md"]
HUB_BIN_PATTERNS = ["*.json", "*.bin", "*.txt", "*.model"]


@dataclass(frozen=True)
class Resolved:
    kind: str  # checkpoint | run | pair | runs | hf
    path: Path  # local directory (for a Hub id: the snapshot in the HF cache)
    given: str  # what the user typed
    hub_id: str | None = None
    checkpoints: tuple[Path, ...] = ()  # a run's checkpoints by step; a checkpoint: itself
    runs: tuple[Path, ...] = field(default=())  # pair / runs: the run directories, encoder first

    @property
    def label(self) -> str:
        return self.hub_id or self.given


def _step_of(ck: Path) -> tuple[int, str]:
    try:
        meta = json.loads((ck / "ettin.json").read_text()).get("meta") or {}
        if isinstance(meta.get("step"), int):
            return meta["step"], ck.name
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return int(ck.name), ck.name
    except ValueError:
        return -1, ck.name


def run_checkpoints(run: Path) -> list[Path]:
    """A run's complete, usable checkpoints (with ettin.json), by step."""
    ck = Path(run) / CHECKPOINTS_DIR
    if not ck.is_dir():
        return []
    found = [d for d in ck.iterdir() if d.is_dir() and not d.name.startswith(".") and not d.name.endswith(".nonfinite")
             and (d / "ettin.json").is_file()]  # *.nonfinite: set aside by the trainer's NaN guard
    return sorted(found, key=_step_of)


def find_runs(path: Path, depth: int = 3) -> list[Path]:
    """Run directories (with checkpoints/) below ``path``: encoder before decoder, then by name."""
    if depth <= 0 or not path.is_dir():
        return []
    order = {"encoder": 0, "decoder": 1}
    subs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != CHECKPOINTS_DIR]
    subs.sort(key=lambda d: (order.get(d.name, 2), d.name))
    out: list[Path] = []
    for d in subs:
        if (d / CHECKPOINTS_DIR).is_dir():
            out.append(d)
        else:
            out.extend(find_runs(d, depth - 1))
    return out


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``text`` reads as a Hub id and is not a local path."""
    s = str(text)
    if os.path.exists(s) or s.startswith((".", "/", "~")) or ".." in s or s.endswith((".json", ".yaml", ".yml")):
        return None
    m = _HUB_ID.match(s)
    return (m.group("repo"), m.group("rev")) if m else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """A local snapshot of a Hub model (config, tokenizer, weights), downloaded into the HF cache
    unless it is there already; offline (``HF_HUB_OFFLINE``) only the cache is used."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise EttinError(f"{repo}: reading a Hugging Face Hub id needs huggingface_hub (pip install huggingface_hub), "
                         "or give a local directory") from None
    from ettin.progress import status

    offline = _offline()
    if not offline:
        status(f"fetching {repo}{'@' + revision if revision else ''} from the Hugging Face Hub into its cache")

    def fetch(patterns):
        return Path(huggingface_hub.snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns,
                                                      ignore_patterns=["*/*"], local_files_only=offline))

    rev = f" (revision {revision})" if revision else ""
    try:
        path = fetch(HUB_PATTERNS)
        if not any(path.glob("*.safetensors")) and not (path / "config.json").is_file():
            raise EttinError(f"{repo}{rev}: the Hub repository has no config.json (not a transformers model)")
        if not any(path.glob("*.safetensors")):
            path = fetch(HUB_BIN_PATTERNS)
    except EttinError:
        raise
    except hf_errors.LocalEntryNotFoundError:
        raise EttinError(f"{repo}{rev}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                         "(unset it to download, or give a local directory)") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise EttinError(f"{repo}: no such local directory, and no such model on the Hugging Face Hub (or it is private/gated) "
                         f"({type(e).__name__}; for a gated model log in with 'hf auth login')") from None
    except hf_errors.RevisionNotFoundError:
        raise EttinError(f"{repo}: the Hub repository has no revision '{revision}'") from None
    except (OSError, ValueError, hf_errors.HfHubHTTPError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise EttinError(f"{repo}{rev}: could not fetch from the Hugging Face Hub ({type(e).__name__}: {first}); "
                         "set HF_HUB_OFFLINE=1 to use the cache only") from None
    return path


def resolve_model(arg: str | os.PathLike) -> Resolved:
    """Classify a model argument (fetching a Hub id); a wrong kind of path gets a fitting hint."""
    given = str(arg)
    path = Path(arg)
    if not path.exists():
        hid = hub_id(given)
        if hid is not None:
            snap = hub_snapshot(*hid)
            return Resolved("hf", snap, given, hub_id=given)
        raise EttinError(f"{path}: no such checkpoint, run directory or Hugging Face directory "
                         "(a Hugging Face Hub id looks like ORG/NAME, e.g. jhu-clsp/ettin-encoder-150m)")
    if not path.is_dir():
        raise EttinError(f"{path}: expected a directory (checkpoint, run directory or Hugging Face directory), got a file")
    if (path / "ettin.json").is_file():
        return Resolved("checkpoint", path, given, checkpoints=(path,))
    if (path / "config.json").is_file():
        return Resolved("hf", path, given)
    if (path / CHECKPOINTS_DIR).is_dir():
        cks = run_checkpoints(path)
        if not cks:
            raise EttinError(f"{path}: run directory has no checkpoints yet (expected {path / CHECKPOINTS_DIR}/<step>/ettin.json)")
        return Resolved("run", path, given, checkpoints=tuple(cks))
    if path.name == CHECKPOINTS_DIR and any((d / "ettin.json").is_file() for d in path.iterdir() if d.is_dir()):
        raise EttinError(f"{path}: this is a run's checkpoints folder; give the run ({path.parent}) or one checkpoint "
                         f"({path}/<step>)")
    runs = find_runs(path)
    if runs:
        names = {r.name for r in runs}
        kind = "pair" if {"encoder", "decoder"} <= names and all(r.parent == path for r in runs) else "runs"
        cks = tuple(c for r in runs for c in run_checkpoints(r))
        return Resolved(kind, path, given, checkpoints=cks, runs=tuple(runs))
    if (path / "manifest.json").is_file():
        raise EttinError(f"{path}: a prepared data directory, not a model")
    if (path / "tokenizer.json").is_file():
        raise EttinError(f"{path}: a tokenizer directory, not a model (no config.json or ettin.json)")
    raise EttinError(f"{path}: not a checkpoint (no ettin.json), run directory (no {CHECKPOINTS_DIR}/), "
                     "pair run (no encoder/ or decoder/ runs) or Hugging Face directory (no config.json)")


def single_model(arg: str | os.PathLike, command: str) -> Resolved:
    """A model argument that must name one model: a run becomes its last checkpoint; a pair or a
    directory of runs is refused with the runs to choose from."""
    r = resolve_model(arg)
    if r.kind == "run":
        return Resolved("checkpoint", r.checkpoints[-1], r.given, checkpoints=(r.checkpoints[-1],), runs=(r.path,))
    if r.kind in ("pair", "runs"):
        which = " or ".join(str(x) for x in r.runs[:4]) + (" ..." if len(r.runs) > 4 else "")
        what = "a pair run (two models)" if r.kind == "pair" else f"a directory of {len(r.runs)} runs"
        raise EttinError(f"{r.path}: {what}; ettin {command} takes one model: use {which}")
    return r


__all__ = ["Resolved", "find_runs", "hub_id", "hub_snapshot", "resolve_model", "run_checkpoints", "single_model"]
