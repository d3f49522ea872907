"""The task registry: names, groups, where each task's files live, which module runs it.

A task belongs to a family; each family module has ``load(spec, task_dir, split, opts)`` (read
and check the files, before any model is loaded) and ``run(eval_model, spec, data, opts)``
(-> ``{METRIC: value, ..., "n": count}``).

Beyond the named tasks, any directory works as ``<family>/<task>`` for the data-driven families
(``mc/<task>``: multiple choice; ``lm/<task>`` or ``lm_eval/<task>``: perplexity on a "text"
field, or last-word accuracy on context/continuation lines; ``glue/<task>`` with a meta.json
entry; ``retrieval/<task>`` in the BEIR layout; ``qa/<task>``), and a bare name finds a
directory under ``lm_eval/``, ``lm/`` or ``mc/``. The ``lm`` group includes every text
directory found under ``lm_eval/`` and ``lm/``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import EttinError
from ettin.eval import glue, lm, mc, qa, retrieval

FAMILIES = {
    "mc": ("ettin.eval.mc", ("mc",)),
    "lm": ("ettin.eval.lm", ("lm_eval", "lm")),
    "qa": ("ettin.eval.qa", ("qa",)),
    "glue": ("ettin.eval.glue", ("glue",)),
    "retrieval": ("ettin.eval.retrieval", ("retrieval",)),
    "winogender": ("ettin.eval.winogender", ("",)),
}
FAMILY_ALIASES = {"lm_eval": "lm"}

GROUPS: dict[str, tuple[str, ...]] = {
    "mc": mc.KNOWN,
    "lm": lm.KNOWN,
    "qa": qa.KNOWN,
    "glue": glue.KNOWN,
    "retrieval": retrieval.KNOWN,
}
KNOWN: dict[str, str] = {}
for _fam, _names in GROUPS.items():
    for _n in _names:
        KNOWN[_n] = _fam
KNOWN["winogender"] = "winogender"
GROUP_NAMES = tuple(GROUPS) + ("all",)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the key in the results
    family: str

    @property
    def module(self):
        return importlib.import_module(FAMILIES[self.family][0])

    def candidates(self, data_dir: Path) -> list[Path]:
        return [data_dir / d / self.name if d else data_dir / self.name for d in FAMILIES[self.family][1]]

    def task_dir(self, data_dir: Path) -> Path:
        cands = self.candidates(data_dir)
        for c in cands:
            if c.is_dir():
                return c
        return cands[0]


def _discovered_lm(data_dir: Path | None) -> list[str]:
    if data_dir is None:
        return []
    out = []
    for d in FAMILIES["lm"][1]:
        root = data_dir / d
        if root.is_dir():
            out.extend(p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith("."))
    return out


def _generic(name: str, data_dir: Path | None) -> TaskSpec | None:
    if data_dir is None:
        return None
    for fam in ("lm", "mc"):
        spec = TaskSpec(name, fam)
        if any(c.is_dir() for c in spec.candidates(data_dir)):
            return spec
    return None


def known_list() -> str:
    return ", ".join(KNOWN)


def resolve_tasks(tasks, data_dir: str | Path | None = None) -> list[TaskSpec]:
    """TaskSpecs for a comma-separated string or a list of task and group names."""
    data_dir = Path(data_dir) if data_dir is not None else None
    items = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    items = [t.strip() for t in items if t and t.strip()]
    if not items:
        raise EttinError(f"no tasks given: name tasks ({known_list()}) or groups ({', '.join(GROUP_NAMES)})")
    out: list[TaskSpec] = []
    for item in items:
        if item == "all":
            out.extend(TaskSpec(n, f) for n, f in KNOWN.items())
            out.extend(TaskSpec(n, "lm") for n in _discovered_lm(data_dir))
        elif item in GROUPS:
            out.extend(TaskSpec(n, item) for n in GROUPS[item])
            if item == "lm":
                out.extend(TaskSpec(n, "lm") for n in _discovered_lm(data_dir))
        elif "/" in item:
            fam, name = item.split("/", 1)
            fam = FAMILY_ALIASES.get(fam, fam)
            if fam not in FAMILIES or fam == "winogender" or not name or "/" in name or name.startswith("."):
                raise EttinError(f"unknown task '{item}': a '<family>/<task>' name needs a family among "
                                 f"mc, lm, qa, glue, retrieval; known tasks are {known_list()}")
            out.append(TaskSpec(name, fam))
        elif item in KNOWN:
            out.append(TaskSpec(item, KNOWN[item]))
        else:
            spec = _generic(item, data_dir)
            if spec is None:
                raise EttinError(f"unknown task '{item}': known tasks are {known_list()}; groups: {', '.join(GROUP_NAMES)}; "
                                 "or <family>/<task> for a task directory of your own (families: mc, lm, qa, glue, retrieval)")
            out.append(spec)
    seen, uniq = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            uniq.append(s)
    return uniq


def data_dir_or_default(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        env = os.environ.get("ETTIN_DATA")
        if not env:
            raise EttinError("no data directory: pass --data DIR (the layout of ../shared/data) or set ETTIN_DATA")
        data_dir = env
    p = Path(data_dir)
    if not p.is_dir():
        raise EttinError(f"{p}: data directory not found (expected the layout of ../shared/data: mc/, glue/, lm_eval/, ...)")
    return p
