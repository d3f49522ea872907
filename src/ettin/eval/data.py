"""Reading evaluation files: JSONL (plain or gzip) and TSV, with ``file:line`` errors.

Layout (see ../shared/data/README.md): ``<family>/<task>/<split>*.jsonl`` for evaluation
files (a split may be sharded: ``validation-00000-of-00002.jsonl``), ``train*.jsonl`` for
fine-tuning, and the BEIR layout for retrieval. Every problem with a file is an
:class:`EttinError` naming the path (and line) and what was expected.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ettin.errors import EttinError


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is ``path:line: ...``."""
    path = Path(path)
    out: list[tuple[int, dict]] = []
    try:
        with _open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EttinError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise EttinError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                out.append((i, obj))
    except UnicodeDecodeError as e:
        raise EttinError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, EttinError):
            raise
        raise EttinError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return out


def read_tsv(path: str | Path, *, header: bool = True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header columns, [(line number, fields)]) of a tab-separated file."""
    path = Path(path)
    rows: list[tuple[int, list[str]]] = []
    cols: list[str] = []
    try:
        with _open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if header and not cols:
                    cols = fields
                    continue
                rows.append((i, fields))
    except UnicodeDecodeError as e:
        raise EttinError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise EttinError(f"{path}: cannot read ({e.strerror or e})") from None
    return cols, rows


def split_files(task_dir: Path, split: str) -> list[Path]:
    """``split.jsonl[.gz]`` or its shards ``split-*.jsonl[.gz]``, sorted."""
    if not task_dir.is_dir():
        return []
    found = []
    for p in task_dir.iterdir():
        if not p.is_file():
            continue
        name = p.name
        for ext in (".jsonl", ".jsonl.gz"):
            if name.endswith(ext):
                stem = name[: -len(ext)]
                if stem == split or stem.startswith(split + "-"):
                    found.append(p)
    return sorted(found)


def require_split(task_dir: Path, split: str, task: str) -> list[Path]:
    files = split_files(task_dir, split)
    if not files:
        why = "" if task_dir.is_dir() else f" (no directory {task_dir})"
        raise EttinError(f"task '{task}': expected {task_dir / (split + '.jsonl')} (or {split}-*.jsonl shards), not found{why}")
    return files


def load_records(files: list[Path], required: dict[str, type | tuple], *, what: str) -> list[dict]:
    """Every line of ``files`` as a dict, checking the ``required`` fields and their types.

    Each record gets ``_where`` = ``path:line`` for later error messages.
    """
    out = []
    for path in files:
        for lineno, obj in read_jsonl(path):
            for key, typ in required.items():
                if key not in obj:
                    need = ", ".join(required)
                    raise EttinError(f"{path}:{lineno}: missing field '{key}' ({what} lines need {need})")
                if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
                    tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                    raise EttinError(f"{path}:{lineno}: field '{key}' must be {tname}, got {type(obj[key]).__name__}")
            obj["_where"] = f"{path}:{lineno}"
            out.append(obj)
    return out


def example_id(d: dict, files: int = 1):
    """The id a per-example record carries: the line's ``id`` (or ``_id``), else its line number
    (``file:line`` when the split has several shards)."""
    for key in ("id", "_id"):
        v = d.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return v
    where = d.get("_where", "")
    path, _, line = where.rpartition(":")
    if not line.isdigit():
        return where or None
    return int(line) if files <= 1 else f"{Path(path).name}:{line}"
