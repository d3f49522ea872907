"""Training recipes: YAML files validated into frozen dataclasses, errors naming the key path.

A recipe file is either one stage (the keys below) or a list of stages run in order inside one
run directory::

    stages: [stage1.yaml, stage2.yaml, stage3.yaml]   # paths relative to this file, or inline dicts

``--set dotted.key=value`` overrides a field in every stage; ``--set stage2.train.tokens=...``
only in the stage of that name. The resolved recipe (every default filled in, paths absolute)
is saved as ``RUN/recipe.yaml`` and can be run again as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ettin.errors import EttinError


@dataclass(frozen=True)
class ModelSection:
    size: str = "tiny"
    kind: str = "encoder"  # encoder | decoder; `ettin pair` trains both
    # null: random init; "previous": the final checkpoint of the previous stage of this run;
    # else a checkpoint directory or a run directory (its last checkpoint).
    init_from: str | None = None
    load_optimizer: bool = True  # when continuing from the previous stage of the same run
    vocab_size: int | None = None  # default: the data tokenizer's padded vocabulary
    overrides: dict = field(default_factory=dict)  # any ModelConfig field
    attn_impl: str = "auto"  # auto | sdpa | flex
    compile: bool | str = "auto"  # auto: torch.compile each block on a GPU (slower on a CPU, measured)
    activation_checkpointing: bool = False
    # dropout on the attention output projection while training (Ettin: 0.1 in every stage);
    # null keeps the model's own value (0 for a new model)
    attn_out_dropout: float | None = None


@dataclass(frozen=True)
class DataSection:
    sources: list = field(default_factory=list)  # [{path, weight | epochs, name}]


@dataclass(frozen=True)
class TrainSection:
    objective: str | None = None  # mlm | clm | mntp; default from the model kind
    tokens: int = 1_000_000
    seq_len: int = 1024
    rope_theta: float = 10_000.0  # global and local layers alike (Ettin synchronises them)
    mask_rate: float = 0.3
    global_batch: int = 4608  # samples per optimizer step (after batch-size warmup)
    micro_batch: int = 16  # packed rows per forward pass per process
    # Tokens a sample holds on average. null: a sample is one full packed row of seq_len tokens.
    # A number or "auto" (measured from the stage's data: documents cut into pieces of at most
    # seq_len tokens, as a run that does not pack counts them): global_batch and
    # batch_warmup_start count such samples, and a step takes
    # round(samples * tokens_per_sample / seq_len) packed rows, so tokens per step and the
    # number of steps match a run that counts its batch in unpacked samples (Ettin, stages 2-3).
    tokens_per_sample: float | str | None = None
    batch_warmup_tokens: int = 0
    batch_warmup_start: int | None = None  # default global_batch // 6
    batch_multiple: int = 1  # warmup batch sizes are rounded down to a multiple of this
    seed: int = 21
    # attention (and RoPE positions) confined to each packed document; false: whole rows, as
    # in runs without document masking (the objectives still never predict across documents)
    document_masking: bool = True
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"
    max_steps: int | None = None


@dataclass(frozen=True)
class ScheduleSection:
    kind: str = "warmup_constant"  # warmup_constant | one_minus_sqrt | linear | trapezoid
    warmup_tokens: int = 0
    start_factor: float = 1.0  # LR at the start of the decay, as a fraction of peak
    end_factor: float = 1.0  # LR at the end of the stage, as a fraction of peak
    decay_tokens: int | None = None  # trapezoid: length of the final linear decay


@dataclass(frozen=True)
class OptimSection:
    name: str = "stableadamw"  # stableadamw | adamw
    lr: float = 8e-4  # peak LR
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5
    grad_clip: float | None = None
    schedule: ScheduleSection = field(default_factory=ScheduleSection)


@dataclass(frozen=True)
class CheckpointSection:
    every_tokens: int = 8_500_000_000
    keep: str = "all"  # all | last


@dataclass(frozen=True)
class DistributedSection:
    strategy: str = "ddp"  # ddp | fsdp2 (only used under torchrun)
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass(frozen=True)
class LoggingSection:
    every_steps: int = 1
    tensorboard: bool = False  # true: also write RUN/tb (needs the tensorboard package; warns once without it)
    peak_flops: float | None = None  # for MFU; default from the GPU name


@dataclass(frozen=True)
class Stage:
    name: str = "stage1"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def objective(self) -> str:
        return self.train.objective or ("clm" if self.model.kind == "decoder" else "mlm")


_CHOICES = {
    "model.kind": ("encoder", "decoder"),
    "model.attn_impl": ("auto", "sdpa", "flex"),
    "model.compile": ("auto", True, False),
    "train.objective": (None, "mlm", "clm", "mntp"),
    "train.precision": ("auto", "fp32", "bf16"),
    "optim.name": ("stableadamw", "adamw"),
    "optim.schedule.kind": ("warmup_constant", "one_minus_sqrt", "linear", "trapezoid"),
    "checkpoint.keep": ("all", "last"),
    "distributed.strategy": ("ddp", "fsdp2"),
}


# -- generic validation ---------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str, source: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, source)
            except EttinError:
                continue
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise EttinError(f"{source}: '{where}' must be {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise EttinError(f"{source}: '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value.replace("_", ""))
            except ValueError:
                raise EttinError(f"{source}: '{where}' must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise EttinError(f"{source}: '{where}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                raise EttinError(f"{source}: '{where}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EttinError(f"{source}: '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise EttinError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise EttinError(f"{source}: '{where}' must be a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise EttinError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return value
    return value


def _build(cls, data, where: str, source: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EttinError(f"{source}: '{where or 'recipe'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{(where + '.') if where else ''}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise EttinError(f"{source}: unknown key '{path}'{hint}")
        v = _coerce(value, hints[key], path, source)
        if path in _CHOICES and v not in _CHOICES[path]:
            choices = ", ".join(str(c) for c in _CHOICES[path] if c is not None)
            raise EttinError(f"{source}: '{path}' must be one of {choices}, got {v!r}")
        kwargs[key] = v
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value, source: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise EttinError(f"{source}: cannot set '{dotted}': '{k}' is not a mapping")
        cur = nxt
    cur[keys[-1]] = value


def parse_set(items: list[str] | None) -> list[tuple[str, object]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise EttinError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
    return out


def _check_stage(stage: Stage, source: str) -> Stage:
    from ettin.validate import check_stage_values

    check_stage_values(stage, source)
    t, o = stage.train, stage.optim
    if t.tokens <= 0:
        raise EttinError(f"{source}: 'train.tokens' must be positive")
    if t.seq_len < 2:
        raise EttinError(f"{source}: 'train.seq_len' must be at least 2")
    if not 0 <= t.mask_rate <= 1:
        raise EttinError(f"{source}: 'train.mask_rate' must lie in [0, 1], got {t.mask_rate}")
    if t.global_batch < 1 or t.micro_batch < 1:
        raise EttinError(f"{source}: 'train.global_batch' and 'train.micro_batch' must be positive")
    tps = t.tokens_per_sample
    if isinstance(tps, str) and tps != "auto":
        raise EttinError(f"{source}: 'train.tokens_per_sample' must be a number of tokens or 'auto', got {tps!r}")
    if isinstance(tps, float) and not 1 <= tps <= t.seq_len:
        raise EttinError(f"{source}: 'train.tokens_per_sample' must lie in [1, train.seq_len={t.seq_len}], got {tps}")
    if stage.model.attn_out_dropout is not None and not 0 <= stage.model.attn_out_dropout < 1:
        raise EttinError(f"{source}: 'model.attn_out_dropout' must lie in [0, 1), got {stage.model.attn_out_dropout}")
    if t.batch_warmup_start is not None and not 1 <= t.batch_warmup_start <= t.global_batch:
        raise EttinError(f"{source}: 'train.batch_warmup_start' must lie in [1, train.global_batch]")
    if len(o.betas) != 2:
        raise EttinError(f"{source}: 'optim.betas' must have two numbers, got {o.betas}")
    if o.lr <= 0:
        raise EttinError(f"{source}: 'optim.lr' must be positive")
    if stage.objective == "clm" and stage.model.kind == "encoder" and stage.model.init_from is None:
        pass  # an encoder-shaped model trained causally from scratch is just a decoder; allowed
    if stage.checkpoint.every_tokens <= 0:
        raise EttinError(f"{source}: 'checkpoint.every_tokens' must be positive")
    if not stage.data.sources:
        raise EttinError(f"{source}: 'data.sources' is empty: name at least one prepared data directory")
    for i, s in enumerate(stage.data.sources):
        if not isinstance(s, dict) or "path" not in s:
            raise EttinError(f"{source}: 'data.sources[{i}]' must be a mapping with a 'path'")
        unknown = set(s) - {"path", "name", "weight", "epochs"}
        if unknown:
            raise EttinError(f"{source}: 'data.sources[{i}]' has unknown key '{sorted(unknown)[0]}' (known: path, name, weight, epochs)")
    return stage


def _resolve_paths(raw: dict, base: Path | None) -> dict:
    """Data paths and init paths: expand ~ and $VARS; relative paths are relative to the CWD."""

    def fix(p):
        if p is None or p == "previous":
            return p
        return str(Path(os.path.expandvars(os.path.expanduser(str(p)))).absolute())

    data = raw.get("data") or {}
    for s in data.get("sources") or []:
        if isinstance(s, dict) and "path" in s:
            s["path"] = fix(s["path"])
    model = raw.get("model") or {}
    if isinstance(model, dict) and model.get("init_from"):
        model["init_from"] = fix(model["init_from"])
    return raw


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise EttinError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise EttinError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise EttinError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise EttinError(f"{path}: a recipe must be a mapping")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> list[Stage]:
    """Load a recipe file into its list of validated stages (one for a single-stage file)."""
    path = Path(path)
    raw = _load_yaml(path)
    if "stages" in raw:
        extra = set(raw) - {"stages"}
        if extra:
            raise EttinError(f"{path}: a multi-stage recipe has only 'stages', found '{sorted(extra)[0]}'")
        entries = []
        if not isinstance(raw["stages"], list):
            raise EttinError(f"{path}: 'stages' must be a list of file names or mappings, got {raw['stages']!r}")
        for i, item in enumerate(raw["stages"]):
            if isinstance(item, str):
                sub = path.parent / item
                d = _load_yaml(sub)
                entries.append((d, str(sub)))
            elif isinstance(item, dict):
                entries.append((item, f"{path}:stages[{i}]"))
            else:
                raise EttinError(f"{path}: 'stages[{i}]' must be a file name or a mapping")
        if not entries:
            raise EttinError(f"{path}: 'stages' is empty")
    else:
        entries = [(raw, str(path))]
    sets = parse_set(overrides)
    names = [str(d.get("name", f"stage{i + 1}")) for i, (d, _) in enumerate(entries)]
    sections = [f.name for f in dataclasses.fields(Stage)]
    for key, _ in sets:
        head = key.split(".", 1)[0]
        if head not in sections and head not in names:
            close = difflib.get_close_matches(head, sections + names, n=1)
            raise EttinError(f"--set {key}: '{head}' is neither a recipe section ({', '.join(sections)}) nor a stage of "
                             f"{path} (stages: {', '.join(names)})" + (f"; did you mean '{close[0]}'?" if close else ""))
    stages = []
    for i, (d, src) in enumerate(entries):
        d = dict(d)
        d.setdefault("name", names[i])
        for key, value in sets:
            head = key.split(".", 1)[0]
            if head in names and "." in key:
                if head == d["name"]:
                    _set_dotted(d, key.split(".", 1)[1], value, "--set")
            else:
                _set_dotted(d, key, value, "--set")
        d = _resolve_paths(d, path.parent)
        stage = _build(Stage, d, "", src)
        stages.append(_check_stage(stage, src))
    if len(set(s.name for s in stages)) != len(stages):
        raise EttinError(f"{path}: stage names must be unique, got {[s.name for s in stages]}")
    return stages


RESOLVED_HEADER = """\
# Resolved recipe: every default filled in; runnable as it is with `ettin train` / `ettin pair`.
# Not claims about this run: 'auto' values (device, precision, attn_impl, compile) are decided
# when it starts; distributed.* applies only under torchrun; objective null means the model
# kind's (mlm for an encoder, clm for a decoder). What ran is recorded in metrics.jsonl and
# checkpoints/<step>/trainer/state.json (world_size, parallel).
"""


def stages_to_yaml(stages: list[Stage]) -> str:
    return RESOLVED_HEADER + yaml.safe_dump({"stages": [s.to_dict() for s in stages]}, sort_keys=False)


def stage_from_dict(d: dict, source: str = "recipe") -> Stage:
    return _check_stage(_build(Stage, d, "", source), source)
