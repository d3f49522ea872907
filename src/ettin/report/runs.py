"""Find run directories under the paths a user gives and read what they recorded.

A run is any directory holding ``metrics.jsonl`` (one JSON object per optimizer step, plus
optional ``{"type": "eval", ...}`` records) and/or ``eval.jsonl`` (one object per evaluated
checkpoint: ``{"model", "checkpoint", "step", "tokens", "kind", "objective", "origin",
"results": {TASK: {METRIC: value, "n": count}}}``). Pair runs (``RUN/encoder``,
``RUN/decoder``) and demo directories (``pair/``, ``convert/``) are just nested runs.

Reading is lenient where a file is still being written (a truncated last line is skipped) and
strict otherwise: a malformed line is an :class:`EttinError` naming ``file:line``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ettin.errors import EttinError

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# Step-record fields that describe the step rather than measure it (kept out of the numbers).
STEP_KEYS = ("step", "tokens")
KINDS = ("encoder", "decoder")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class EvalRecord:
    step: int | None
    tokens: float | None
    results: dict[str, dict[str, float]]  # task -> metric -> value (numbers only)
    checkpoint: str = ""
    source: str = "eval"  # "eval" (eval.jsonl) or "metrics" (an eval record inside metrics.jsonl)


@dataclass
class Run:
    path: Path
    label: str
    root: Path
    steps: list[dict] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    kind: str = "unknown"
    objective: str = ""
    origin: str = "native"

    @property
    def converted(self) -> bool:
        return self.origin not in ("", "native")

    def final_results(self) -> dict[str, EvalRecord]:
        """Per task, its scores at the latest checkpoint evaluated on it (eval.jsonl wins ties).

        Each value is an :class:`EvalRecord` holding that one task, so its ``tokens``/``step`` say
        which checkpoint the numbers are from.
        """
        def key(e: EvalRecord) -> tuple:
            return (e.tokens if e.tokens is not None else -1, e.step if e.step is not None else -1, e.source == "eval")

        out: dict[str, EvalRecord] = {}
        for e in sorted(self.evals, key=key):
            for task, metrics in e.results.items():
                prev = out.get(task)
                if prev is not None and (prev.tokens, prev.step) == (e.tokens, e.step):
                    merged = dict(metrics)
                    merged.update(prev.results[task])  # keep the winner's values, add what it lacks
                    metrics = merged
                out[task] = EvalRecord(e.step, e.tokens, {task: dict(metrics)}, e.checkpoint, e.source)
        return out

    def final_step(self) -> dict | None:
        return self.steps[-1] if self.steps else None


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed object) for every non-blank line; a truncated last line is skipped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EttinError(f"{path}: cannot read ({e.strerror or e})") from None
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete_last = text.endswith("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) and not complete_last:
                continue  # the writer is mid-line (or crashed mid-line): not an error
            raise EttinError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return out


def _is_step_record(obj: dict) -> bool:
    t = obj.get("type")
    if t is not None and t not in ("step", "train"):
        return False
    return is_number(obj.get("loss")) and is_number(obj.get("step"))


def _numeric_results(results, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(results, dict):
        raise EttinError(f"{where}: 'results' must be an object {{TASK: {{METRIC: value}}}}, got {type(results).__name__}")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            if is_number(metrics):
                out.setdefault(str(task), {})["value"] = float(metrics)
            continue
        flat: dict[str, float] = {}
        _flatten("", metrics, flat)
        if flat:
            out[str(task)] = flat
    return out


def _flatten(prefix: str, d: dict, into: dict[str, float]) -> None:
    """Nested metric dicts become "outer/inner" names; non-numbers are dropped."""
    for k, v in d.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            _flatten(name, v, into)
        elif is_number(v):
            into[name] = v


def _num_or_none(v):
    return v if is_number(v) else None


def _eval_from_metrics_line(obj: dict, where: str) -> EvalRecord | None:
    if isinstance(obj.get("results"), dict):
        results = _numeric_results(obj["results"], where)
    else:
        task = str(obj.get("task") or obj.get("name") or "eval")
        nums = {k: v for k, v in obj.items() if k not in ("step", "tokens", "type", "task", "name") and is_number(v)}
        results = {task: nums} if nums else {}
    if not results:
        return None
    return EvalRecord(_num_or_none(obj.get("step")), _num_or_none(obj.get("tokens")), results,
                      str(obj.get("checkpoint", "")), "metrics")


def _discover(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) with metrics.jsonl or eval.jsonl."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # never descend into checkpoints or hidden/temporary directories
        dirnames[:] = sorted(d for d in dirnames if d != CHECKPOINTS_DIR and not d.startswith("."))
        if METRICS_FILE in filenames or EVAL_FILE in filenames:
            found.append(Path(dirpath))
    return found


def _kind_from_causal(v) -> str | None:
    if isinstance(v, bool):
        return "decoder" if v else "encoder"
    return None


def _checkpoint_model(run_dir: Path) -> dict:
    ck = run_dir / CHECKPOINTS_DIR
    if not ck.is_dir():
        return {}
    steps = []
    for d in ck.iterdir():
        if d.is_dir() and (d / "ettin.json").is_file():
            try:
                steps.append((int(d.name), d))
            except ValueError:
                steps.append((-1, d))
    for _, d in sorted(steps, reverse=True):
        try:
            doc = json.loads((d / "ettin.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
            return doc["model"]
    return {}


def _recipe_model(run_dir: Path) -> dict:
    p = run_dir / "recipe.yaml"
    if not p.is_file():
        return {}
    try:
        import yaml

        doc = yaml.safe_load(p.read_text())
    except Exception:  # noqa: BLE001 - a recipe we cannot parse only costs us a fallback
        return {}
    if not isinstance(doc, dict):
        return {}
    out = {}
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    for key in ("kind", "objective", "origin", "causal"):
        if key in doc:
            out[key] = doc[key]
        elif key in model:
            out[key] = model[key]
    return out


def _fill_identity(run: Run, metrics_meta: dict, eval_meta: dict) -> None:
    ck = _checkpoint_model(run.path)
    rec = _recipe_model(run.path)
    kind = (metrics_meta.get("kind") or eval_meta.get("kind") or _kind_from_causal(ck.get("causal"))
            or rec.get("kind") or _kind_from_causal(rec.get("causal")))
    if kind not in KINDS:
        name = run.path.name.lower()
        kind = "encoder" if "encoder" in name else "decoder" if "decoder" in name else "unknown"
    run.kind = kind
    run.objective = str(metrics_meta.get("objective") or eval_meta.get("objective") or ck.get("objective")
                        or rec.get("objective") or {"encoder": "mlm", "decoder": "clm"}.get(kind, ""))
    origin = eval_meta.get("origin") or metrics_meta.get("origin") or ck.get("origin") or rec.get("origin")
    run.origin = str(origin) if origin else "native"


def load_run(path: Path, label: str, root: Path) -> Run:
    run = Run(path=path, label=label, root=root)
    metrics_meta: dict = {}
    eval_meta: dict = {}
    mpath = path / METRICS_FILE
    if mpath.is_file():
        for lineno, obj in read_jsonl(mpath):
            where = f"{mpath}:{lineno}"
            if not isinstance(obj, dict):
                raise EttinError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if _is_step_record(obj):
                run.steps.append(obj)
                for key in ("kind", "objective", "origin"):
                    if isinstance(obj.get(key), str) and obj[key]:
                        metrics_meta[key] = obj[key]
            elif obj.get("type") == "eval":
                rec = _eval_from_metrics_line(obj, where)
                if rec is not None:
                    run.evals.append(rec)
    epath = path / EVAL_FILE
    if epath.is_file():
        for lineno, obj in read_jsonl(epath):
            where = f"{epath}:{lineno}"
            for item in obj if isinstance(obj, list) else [obj]:
                if not isinstance(item, dict):
                    raise EttinError(f"{where}: expected a JSON object, got {type(item).__name__}")
                if "results" not in item:
                    raise EttinError(f"{where}: evaluation record has no 'results'")
                results = _numeric_results(item["results"], where)
                run.evals.append(EvalRecord(_num_or_none(item.get("step")), _num_or_none(item.get("tokens")),
                                            results, str(item.get("checkpoint", "")), "eval"))
                for key in ("kind", "objective", "origin"):
                    if isinstance(item.get(key), str) and item[key]:
                        eval_meta[key] = item[key]
    run.steps.sort(key=lambda s: s["step"])
    _fill_eval_tokens(run)
    _fill_identity(run, metrics_meta, eval_meta)
    return run


def _fill_eval_tokens(run: Run) -> None:
    """Evaluation records without ``tokens`` get them from the step record of the same step."""
    by_step = {s["step"]: s.get("tokens") for s in run.steps if is_number(s.get("tokens"))}
    for e in run.evals:
        if e.tokens is None and e.step is not None:
            e.tokens = by_step.get(e.step)


def discover_runs(paths: list[Path]) -> list[Run]:
    """Every run under ``paths``, each once, labelled by its path relative to what was given."""
    if not paths:
        raise EttinError("report: give at least one run directory")
    runs: list[Run] = []
    seen: set[Path] = set()
    labels: set[str] = set()
    for given in paths:
        given = Path(given)
        if not given.exists():
            raise EttinError(f"{given}: no such file or directory")
        if not given.is_dir() and given.name not in (METRICS_FILE, EVAL_FILE):
            raise EttinError(f"{given}: is a file; give a run directory (or its {METRICS_FILE} / {EVAL_FILE})")
        root = given if given.is_dir() else given.parent
        dirs = _discover(root)
        if not dirs:
            raise EttinError(f"{given}: no runs found (no {METRICS_FILE} or {EVAL_FILE} in it or below it)")
        base = root.resolve().name or str(root)
        for d in dirs:
            real = d.resolve()
            if real in seen:
                continue
            seen.add(real)
            rel = d.relative_to(root)
            label = base if str(rel) == "." else f"{base}/{rel.as_posix()}"
            n, unique = 2, label
            while unique in labels:
                unique, n = f"{label} ({n})", n + 1
            labels.add(unique)
            runs.append(load_run(d, unique, root.resolve()))
    # native runs first (they set the colours), then converted ones; otherwise as found
    return sorted(runs, key=lambda r: r.converted)


def pick_native(converted: Run, runs: list[Run]) -> Run | None:
    """The native run of the same kind to compare a converted run with (closest on disk)."""
    cands = [r for r in runs if not r.converted and r.kind == converted.kind and r is not converted]
    if not cands:
        return None

    def closeness(r: Run) -> tuple:
        a, b = converted.path.resolve().parts, r.path.resolve().parts
        common = 0
        for x, y in zip(a, b):
            if x != y:
                break
            common += 1
        return (r.root == converted.root, common, bool(r.evals))

    return max(cands, key=closeness)
