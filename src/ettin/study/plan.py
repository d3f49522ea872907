"""The study as a list of units, each an artifact named by a fingerprint of its inputs.

A unit's fingerprint hashes its resolved inputs (recipe values, options, data hashes) and the
fingerprints of the units it depends on, so a changed recipe value changes exactly the
fingerprints downstream of it. Units, in order, per size:

    data                                   tokenizer + prepared shards (shared by every size)
    <size>/pair/stage{1,2,3}               the lockstep pair, one stage each (resumes from the last)
    <size>/convert/encoder-from-decoder    MNTP on the final decoder
    <size>/convert/decoder-from-encoder    CLM on the final encoder
    <size>/export/<model>                  Hugging Face directory of each model's final checkpoint
    <size>/eval/<model>/<step>/<task>      one task on one checkpoint (every checkpoint: trajectories)

Nothing here runs anything: the plan (and ``ettin study --status``) is computed from the
options alone; checkpoint steps are predicted from the step plan with the trainer's rule.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ettin.errors import EttinError
from ettin.train.recipe import _load_yaml as load_yaml
from ettin.validate import MAX_TOKENS

STAGE_FILES = ("stage1.yaml", "stage2.yaml", "stage3.yaml")
CROSS_FILE = "cross-objective.yaml"
MODELS = ("encoder", "decoder", "encoder-from-decoder", "decoder-from-encoder")
CONVERSIONS = {"encoder-from-decoder": ("decoder", "mntp"), "decoder-from-encoder": ("encoder", "clm")}
NEVER = MAX_TOKENS  # checkpoint.every_tokens that never triggers (stage ends still checkpoint)


@dataclass(frozen=True)
class Preset:
    """What ``--preset`` fills in (every field can still be given on the command line)."""

    name: str
    sizes: tuple[str, ...]
    tokens: float | None  # pair pre-training tokens per size (stages 1-3); None: the recipes' own
    recipe: str  # a packaged recipe directory; "{size}" is replaced per size
    vocab_size: int
    checkpoints: int  # checkpoints in stage 1 (stages 2, 3 and conversions add their ends)
    convert_checkpoints: int
    batch_tokens: int | None  # rescale global batches to about this many tokens per step
    eval: dict = field(default_factory=dict)  # EvalOptions overrides
    tasks: str = "all"


PRESETS = {
    # two sizes, each a pair + two conversions + every model evaluated at every checkpoint on
    # the whole suite (examples capped), on 2 CPU cores
    # (stage ends only; 256 sequences per forward pass: 4-7x faster encoder MC scoring than 32)
    "cpu": Preset("cpu", ("micro", "tiny"), None, "small", 2048, 1, 1, None,
                  {"limit": 64, "seeds": (0, 1), "lrs": (3e-4,), "epochs": 1, "batch_size": 256,
                   "retrieval_epochs": 1, "max_new_tokens": 16},
                  # the suite without wikitext2: encoder pseudo-perplexity over its 1.1 MB is ~90
                  # CPU-seconds per checkpoint even at micro size (--tasks all adds it)
                  "mc,lambada_openai,qa,glue,retrieval,winogender"),
    # the paper's three smallest sizes with one shared token budget; fits a few GPU hours
    "gpu": Preset("gpu", ("17m", "32m", "68m"), 1.0e9, "ettin-{size}", 32768, 4, 2, 262_144,
                  {"limit": 1000, "seeds": (0, 1, 2), "lrs": (1e-4, 3e-4), "epochs": 2, "batch_size": 64,
                   "device": "cuda", "retrieval_epochs": 1}),
}


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study's results depend on (saved as DIR/study-config.json)."""

    sizes: tuple[str, ...]
    out: str
    preset: str = "cpu"
    recipe_dir: str | None = None  # None: the preset's packaged recipes
    tokens: float | None = None
    data: str | None = None  # evaluation data (../shared/data layout); its pretrain/ trains, if present
    tasks: str = "all"
    sets: tuple[str, ...] = ()  # recipe overrides: key=value (stage-prefixed or for every stage)
    eval: dict = field(default_factory=dict)
    vocab_size: int = 2048
    checkpoints: int = 2
    convert_checkpoints: int = 1
    batch_tokens: int | None = None
    n_boot: int = 1000
    seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["sizes"] = list(self.sizes)
        d["sets"] = list(self.sets)
        d["eval"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.eval.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StudyConfig":
        d = dict(d)
        d["sizes"] = tuple(d["sizes"])
        d["sets"] = tuple(d.get("sets") or ())
        d["eval"] = {k: tuple(v) if isinstance(v, list) else v for k, v in (d.get("eval") or {}).items()}
        return cls(**d)


def make_config(*, sizes=None, out, preset: str = "cpu", recipe_dir=None, tokens=None, data=None, tasks=None,
                sets=(), eval_overrides=None, n_boot: int = 1000, seed: int = 0, **fields) -> StudyConfig:
    """The study's configuration: the preset's values, then the given ones (``fields``: any
    other StudyConfig field, e.g. ``checkpoints=1`` or ``vocab_size=512`` for a test)."""
    if preset not in PRESETS:
        raise EttinError(f"unknown --preset '{preset}': choose {' or '.join(PRESETS)}")
    p = PRESETS[preset]
    ev = dict(p.eval)
    ev.update({k: v for k, v in (eval_overrides or {}).items() if v is not None})
    base = dict(
        sizes=tuple(sizes) if sizes else p.sizes, out=str(Path(out).absolute()), preset=preset,
        recipe_dir=str(Path(recipe_dir).absolute()) if recipe_dir else None,
        tokens=float(tokens) if tokens is not None else p.tokens,
        data=str(Path(data).absolute()) if data else None, tasks=tasks or p.tasks, sets=tuple(sets or ()),
        eval=ev, vocab_size=p.vocab_size, checkpoints=p.checkpoints, convert_checkpoints=p.convert_checkpoints,
        batch_tokens=p.batch_tokens, n_boot=n_boot, seed=seed,
    )
    base.update(fields)
    return StudyConfig(**base)


# -- fingerprints ----------------------------------------------------------------------------------
def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


_FILE_HASHES: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) within a process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        from ettin.fsutil import sha256_file

        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def tree_hash(root: Path) -> str:
    """Hash of every file under ``root`` (relative names and contents)."""
    root = Path(root)
    if root.is_file():
        return file_hash(root)
    items = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            items.append((str(p.relative_to(root)), file_hash(p)))
    return digest(items)


# -- units -----------------------------------------------------------------------------------------
@dataclass
class Unit:
    name: str
    kind: str  # data | train | convert | export | eval
    path: Path  # a directory (unit.json inside marks it done) or, for eval, a .json file
    inputs: dict
    deps: tuple[str, ...] = ()
    fingerprint: str = ""
    size: str | None = None
    model: str | None = None
    step: int | None = None
    task: str | None = None
    cost: float = 1.0  # training tokens (train/convert) or 1, for the ETA

    @property
    def marker(self) -> Path:
        return self.path if self.kind == "eval" else self.path / "unit.json"

    def done(self) -> bool:
        try:
            return json.loads(self.marker.read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError, AttributeError):
            return False


@dataclass
class ModelLine:
    """One model of one size: where its checkpoints come from and what it is."""

    size: str
    name: str  # encoder | decoder | encoder-from-decoder | decoder-from-encoder
    kind: str
    objective: str
    origin: str
    checkpoints: list  # [(step, producer unit name, tokens at that checkpoint within its run)]
    base_tokens: int = 0  # pre-training tokens before this line's own run (conversions)

    @property
    def label(self) -> str:
        return f"{self.size}/{self.name}"


@dataclass
class StudyPlan:
    config: StudyConfig
    units: list[Unit]
    lines: list[ModelLine]
    stages: dict  # size -> [Stage x3]
    cross: dict  # size -> Stage
    data_dir: Path | None  # evaluation data
    pretrain: list[Path]
    tasks: list[str]
    # True while the data unit is unfinished and a stage measures ``tokens_per_sample: auto`` on
    # the data: checkpoint steps (and so evaluation units) are estimated with full rows until
    # the data exists; the runner re-plans after the data unit
    provisional: bool = False

    @property
    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def line(self, size: str, name: str) -> ModelLine:
        for ln in self.lines:
            if ln.size == size and ln.name == name:
                return ln
        raise KeyError((size, name))


# -- recipes ----------------------------------------------------------------------------------------
def packaged_recipes() -> Path:
    from importlib.resources import files

    return Path(str(files("ettin") / "recipes"))


def recipe_dir_for(cfg: StudyConfig, size: str) -> Path:
    """The directory holding the four stage files for ``size``."""
    if cfg.recipe_dir:
        base = Path(cfg.recipe_dir)
        if not base.is_dir():
            raise EttinError(f"{base}: --recipe-dir not found")
        for cand in (base, base / f"ettin-{size}", base / size):
            if (cand / STAGE_FILES[0]).is_file():
                return cand
        return base
    name = PRESETS[cfg.preset].recipe.format(size=size)
    return packaged_recipes() / name


def _check_recipe_dir(d: Path) -> None:
    missing = [f for f in STAGE_FILES + (CROSS_FILE,) if not (d / f).is_file()]
    if missing:
        raise EttinError(f"{d}: recipe directory lacks {', '.join(missing)} (a study needs stage1.yaml, stage2.yaml, "
                         f"stage3.yaml and cross-objective.yaml, as in recipes/small/)")


def _scale_tokens(raw: dict, f: float) -> None:
    t = raw.setdefault("train", {})
    for k in ("tokens", "batch_warmup_tokens"):
        if k in t:
            t[k] = max(1, int(float(t[k]) * f))
    sched = raw.setdefault("optim", {}).setdefault("schedule", {})
    for k in ("warmup_tokens", "decay_tokens"):
        if sched.get(k) is not None:
            sched[k] = int(float(sched[k]) * f)


def _rebatch(raw: dict, batch_tokens: int) -> None:
    """Global batch of about ``batch_tokens`` tokens (a small budget needs more, smaller steps)."""
    t = raw.setdefault("train", {})
    seq = int(float(t.get("seq_len", 1024)))
    old = int(float(t.get("global_batch", 4608)))
    rows = max(8, batch_tokens // seq)
    if rows >= old:
        return
    t["global_batch"] = rows
    t["micro_batch"] = min(int(float(t.get("micro_batch", 16))), rows)
    if t.get("batch_warmup_start") is not None:
        start = max(1, int(int(float(t["batch_warmup_start"])) * rows / old))
        t["batch_warmup_start"] = start
        m = max(1, min(int(float(t.get("batch_multiple", 1))), start))
        t["batch_multiple"] = 1 << (m.bit_length() - 1)  # a power of two no larger than the start
    elif t.get("batch_multiple"):
        t["batch_multiple"] = max(1, min(int(float(t["batch_multiple"])), rows))


def _split_sets(sets: tuple[str, ...], names: list[str]) -> dict[str, list[str]]:
    """--set items by stage: 'stage2.optim.lr=...' for one stage, 'optim.lr=...' for all."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in sets:
        if "=" not in item:
            raise EttinError(f"--set expects key=value, got '{item}'")
        head = item.split("=", 1)[0].split(".", 1)[0]
        if head in names and "." in item.split("=", 1)[0]:
            out[head].append(item.split(".", 1)[1])
        else:
            for n in names:
                out[n].append(item)
    return out


def resolve_stages(cfg: StudyConfig, size: str, data_path: Path) -> tuple[list, object]:
    """The size's three pair stages and its cross-objective stage, with the study's values in."""
    from ettin.train.recipe import _resolve_paths, _set_dotted, parse_set, stage_from_dict

    d = recipe_dir_for(cfg, size)
    _check_recipe_dir(d)
    files = list(STAGE_FILES) + [CROSS_FILE]
    raws = [load_yaml(d / f) for f in files]
    names = [str(r.get("name") or Path(f).stem) for r, f in zip(raws, files)]
    if cfg.tokens is not None:
        total = sum(float((r.get("train") or {}).get("tokens", 0)) for r in raws[:3])
        if total <= 0:
            raise EttinError(f"{d}: the stage files give no train.tokens to scale")
        for r in raws:
            _scale_tokens(r, cfg.tokens / total)
    stage_sets = _split_sets(cfg.sets, names)
    out = []
    for i, (raw, f, name) in enumerate(zip(raws, files, names)):
        raw = copy.deepcopy(raw)
        raw["name"] = name
        raw.setdefault("model", {})["size"] = size
        raw["data"] = {"sources": [{"name": "study", "path": str(data_path), "weight": 1.0}]}
        raw["logging"] = {**(raw.get("logging") or {}), "tensorboard": False}
        # train.tokens_per_sample: auto stays as the recipe says: the plan is provisional (full
        # rows) until the data unit exists, then measured as the trainer does (measured_stages)
        if cfg.batch_tokens:
            _rebatch(raw, cfg.batch_tokens)
        tok = int(float(raw["train"]["tokens"]))
        ck = raw.setdefault("checkpoint", {})
        if i == 0:
            ck["every_tokens"] = max(1, -(-tok // max(1, cfg.checkpoints)))
        elif i < 3:
            ck["every_tokens"] = NEVER  # the stage's end only
        else:
            ck["every_tokens"] = max(1, -(-tok // max(1, cfg.convert_checkpoints)))
        ck["keep"] = "all"
        for key, value in parse_set(stage_sets[name]):
            _set_dotted(raw, key, value, "--set")
        raw = _resolve_paths(raw, d)
        out.append(stage_from_dict(raw, f"{d / f}"))
    return out[:3], out[3]


def stage_fingerprint_dict(stage) -> dict:
    d = stage.to_dict()
    d.pop("logging", None)
    d.pop("distributed", None)
    d["train"].pop("device", None)
    d["train"].pop("max_steps", None)
    d["data"] = None  # the data unit's fingerprint stands for it
    if d["model"].get("init_from") not in (None, "previous"):
        d["model"]["init_from"] = "source"
    return d


def predicted_checkpoints(stages: list) -> list[tuple[int, int, int]]:
    """(global step, stage index, run tokens) of every checkpoint the trainer writes for ``stages``
    (its rule: a crossing of checkpoint.every_tokens in run tokens, or a stage's last step)."""
    from ettin.train.schedule import Plan

    plan = Plan(stages)
    ends = {plan.stage_last_step(i) for i in range(len(stages))}
    out = []
    step = 1
    while True:
        p = plan.get(step)
        if p is None:
            break
        every = stages[p.stage_index].checkpoint.every_tokens
        after = p.tokens_before + p.tokens
        if after // every > p.tokens_before // every or step in ends:
            out.append((step, p.stage_index, after))
        step += 1
    return out


# -- data ----------------------------------------------------------------------------------------
def default_data_dir() -> Path | None:
    env = os.environ.get("ETTIN_DATA")
    if env:
        return Path(env)
    cand = Path("../shared/data")
    return cand.absolute() if cand.is_dir() else None


def pretrain_files(data_dir: Path | None) -> list[Path]:
    if data_dir is not None and (data_dir / "pretrain").is_dir():
        files = sorted(p for p in (data_dir / "pretrain").iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if files:
            return files
    from ettin.data import demo_corpus_path

    return [demo_corpus_path()]


# -- the plan --------------------------------------------------------------------------------------
def build_plan(cfg: StudyConfig) -> StudyPlan:
    """Every unit with its fingerprint; raises EttinError on bad input before anything runs."""
    from ettin.config import check_size
    from ettin.eval.api import make_options

    if not cfg.sizes:
        raise EttinError("--sizes is empty: name at least one size (see 'ettin sizes')")
    for s in cfg.sizes:
        check_size(s)
    if len(set(cfg.sizes)) != len(cfg.sizes):
        raise EttinError(f"--sizes names a size twice: {','.join(cfg.sizes)}")
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise EttinError(f"{cfg.data}: --data directory not found (expected the layout of ../shared/data: mc/, glue/, ...)")
    if cfg.tokens is not None and cfg.tokens <= 0:
        raise EttinError(f"--tokens must be positive, got {cfg.tokens:g}")
    data_dir = Path(cfg.data) if cfg.data else default_data_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise EttinError(f"{data_dir}: data directory not found ($ETTIN_DATA)")
    out = Path(cfg.out)
    units_dir = out / "units"
    opts = make_options(**cfg.eval)
    eval_opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k not in ("progress", "device")}

    # tasks: resolved (names known) now; their files are read by the runner before any work
    from ettin.eval.tasks import resolve_tasks

    if data_dir is None:
        task_names = ["heldout"]  # the shipped held-out text (lm), made by the data unit
        if cfg.tasks not in ("all", "heldout"):
            raise EttinError("--tasks needs --data DIR (the layout of ../shared/data) or $ETTIN_DATA")
    else:
        specs = resolve_tasks(cfg.tasks, data_dir)
        if cfg.tasks == "all":  # the suite as far as the data directory holds it
            specs = [s for s in specs if s.task_dir(data_dir).exists()]
        task_names = [s.name for s in specs]

    units: list[Unit] = []
    by: dict[str, Unit] = {}

    def add(u: Unit) -> Unit:
        u.fingerprint = digest({"kind": u.kind, "inputs": u.inputs, "deps": [by[d].fingerprint for d in u.deps]})
        units.append(u)
        by[u.name] = u
        return u

    pretrain = pretrain_files(data_dir)
    data_unit = add(Unit("data", "data", units_dir / "data", {
        "corpus": [(p.name, file_hash(p)) for p in pretrain], "vocab_size": cfg.vocab_size, "heldout": data_dir is None,
    }))
    shards = data_unit.path / "shards"

    lines: list[ModelLine] = []
    stages_by, cross_by = {}, {}
    task_hash = {}
    for t in task_names:
        task_hash[t] = _task_hash(t, data_dir)

    provisional = False
    for size in cfg.sizes:
        stages, cross = resolve_stages(cfg, size, shards)
        stages_by[size], cross_by[size] = stages, cross
        measured, exact = measured_stages(stages + [cross], data_unit.done())
        provisional = provisional or not exact
        ckpts = predicted_checkpoints(measured[:3])
        prev = None
        producers = {}
        for k, st in enumerate(stages):
            u = add(Unit(f"{size}/pair/{st.name}", "train", units_dir / size / "pair" / st.name,
                         {"stage": stage_fingerprint_dict(st), "index": k}, deps=("data",) + ((prev,) if prev else ()),
                         size=size, cost=2.0 * st.train.tokens))
            producers[k] = u.name
            prev = u.name
        last_pair = prev
        pair_ck = [(step, producers[si], tok) for step, si, tok in ckpts]
        pre_tokens = ckpts[-1][2]
        lines.append(ModelLine(size, "encoder", "encoder", "mlm", "scratch", pair_ck))
        lines.append(ModelLine(size, "decoder", "decoder", "clm", "scratch", pair_ck))
        conv_ck = predicted_checkpoints(measured[3:])
        for name, (src, obj) in CONVERSIONS.items():
            u = add(Unit(f"{size}/convert/{name}", "convert", units_dir / size / "convert" / name,
                         {"stage": stage_fingerprint_dict(cross), "source": src, "objective": obj}, deps=(last_pair,),
                         size=size, model=name, cost=float(cross.train.tokens)))
            kind = "encoder" if obj == "mntp" else "decoder"
            lines.append(ModelLine(size, name, kind, obj, f"{src} ({'clm' if src == 'decoder' else 'mlm'}) -> {obj}",
                                   [(s, u.name, t) for s, _, t in conv_ck], base_tokens=pre_tokens))
        for ln in [x for x in lines if x.size == size]:
            last_step, prod, _ = ln.checkpoints[-1]
            add(Unit(f"{size}/export/{ln.name}", "export", units_dir / size / "export" / ln.name,
                     {"model": ln.name, "step": last_step}, deps=(prod,), size=size, model=ln.name))
        for ln in [x for x in lines if x.size == size]:
            for step, prod, _tok in ln.checkpoints:
                for t in task_names:
                    add(Unit(f"{size}/eval/{ln.name}/{step:08d}/{t}", "eval",
                             units_dir / size / "eval" / ln.name / f"{step:08d}" / f"{_safe(t)}.json",
                             {"model": ln.name, "step": step, "task": t, "options": eval_opts, "data": task_hash[t]},
                             deps=(prod,), size=size, model=ln.name, step=step, task=t))
    return StudyPlan(cfg, units, lines, stages_by, cross_by, data_dir, pretrain, task_names, provisional)


def measured_stages(stages: list, data_ready: bool) -> tuple[list, bool]:
    """Stages with ``train.tokens_per_sample: auto`` replaced by the figure measured on the data
    (as the trainer does), or by full rows while the data is not prepared yet (then False)."""
    from dataclasses import replace

    if not any(s.train.tokens_per_sample == "auto" for s in stages):
        return stages, True
    if data_ready:
        from ettin.train.budget import resolve_samples
        from ettin.train.trainer import open_mixture

        return resolve_samples(stages, open_mixture), True
    return [replace(s, train=replace(s.train, tokens_per_sample=float(s.train.seq_len)))
            if s.train.tokens_per_sample == "auto" else s for s in stages], False


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _task_hash(task: str, data_dir: Path | None) -> str:
    if data_dir is None:
        return "shipped-heldout"
    from ettin.eval.tasks import resolve_tasks

    spec = resolve_tasks([task], data_dir)[0]
    d = spec.task_dir(data_dir)
    parts = [tree_hash(d)] if d.exists() else ["missing"]
    if spec.family == "glue" and (data_dir / "glue" / "meta.json").is_file():
        parts.append(file_hash(data_dir / "glue" / "meta.json"))
    return digest(parts)
