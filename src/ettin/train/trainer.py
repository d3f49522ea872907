"""The training loop: one model, or an encoder/decoder pair in lockstep on identical batches.

One place holds the whole loop (nanoGPT style). Each model is a :class:`Learner` (model,
optimiser, objective, run directory); a step loads the global batch once, every learner
applies its objective to the same rows, and each side logs the batch hash. Everything a
resume needs is in the checkpoint, and everything random is a function of (seed, step), so
a run killed at any moment and resumed gives bitwise the same weights and losses on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ettin import checkpoint as ckpt
from ettin import faults
from ettin import objectives as O
from ettin.config import ModelConfig, preset
from ettin.errors import EttinError
from ettin.fsutil import atomic_write_text
from ettin.model import Transformer
from ettin.train import budget
from ettin.train import distributed as D
from ettin.train.optim import build_optimizer, set_lr
from ettin.train.recipe import Stage, load_recipe, stage_from_dict, stages_to_yaml
from ettin.train.schedule import Plan, StepPlan

TRAINER_DIR = "trainer"
OBJECTIVE_TAG = {"mlm": 1, "clm": 2, "mntp": 3}

# bf16 dense matmul peaks (FLOP/s) used for MFU; H100/H200 as measured for this project.
PEAK_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# -- run directory ----------------------------------------------------------------------------
class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipe = self.root / "recipe.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, by step (a directory counts once its trainer state exists)."""
        out = []
        if self.checkpoints.is_dir():
            for d in self.checkpoints.iterdir():
                if d.name.isdigit() and (d / ckpt.META_FILE).is_file() and (d / TRAINER_DIR / "state.json").is_file():
                    out.append((int(d.name), d))
        return sorted(out)

    def checkpoint_at(self, step: int) -> Path:
        return self.checkpoints / f"{step:08d}"


def last_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or the last checkpoint of a run directory."""
    path = Path(path)
    if ckpt.is_checkpoint(path):
        return path
    cps = RunDir(path).list_checkpoints()
    if not cps:
        raise EttinError(f"{path}: no checkpoint found (expected a checkpoint or a run directory with checkpoints/)")
    return cps[-1][1]


# -- recipes in a run -------------------------------------------------------------------------
def merge_run_recipe(run: RunDir, stages: list[Stage]) -> list[Stage]:
    """The run's stage list: what it already had, plus the requested stages it lacks."""
    if not run.recipe.is_file() or not run.list_checkpoints():
        return stages  # a run that never checkpointed has nothing to keep: a fixed recipe may restart it
    try:
        old_raw = yaml.safe_load(run.recipe.read_text()) or {}
        old = [stage_from_dict(d, str(run.recipe)) for d in old_raw.get("stages", [])]
    except (yaml.YAMLError, AttributeError) as e:
        raise EttinError(f"{run.recipe}: unreadable run recipe ({e})") from None
    by_name = {s.name: s for s in old}
    merged = list(old)
    for s in stages:
        if s.name in by_name:
            if _fingerprint(by_name[s.name]) != _fingerprint(s):
                key, was, now = _first_difference(_fingerprint_dict(by_name[s.name]), _fingerprint_dict(s))
                raise EttinError(
                    f"{run.root}: stage '{s.name}' already exists with a different recipe: '{key}' was {was!r}, now {now!r}; "
                    "use a new --out or a new stage name"
                )
        else:
            merged.append(s)
    return merged


def _fingerprint_dict(stage: Stage) -> dict:
    d = stage.to_dict()
    d["train"].pop("max_steps", None)
    d["train"].pop("device", None)
    for sec, key in (("train", "tokens_per_sample"), ("model", "attn_out_dropout")):
        if d[sec].get(key) is None:  # fields added later: unset keeps older runs resumable
            d[sec].pop(key, None)
    d.pop("logging", None)
    d.pop("distributed", None)
    return d


def _fingerprint(stage: Stage) -> str:
    return hashlib.sha256(json.dumps(_fingerprint_dict(stage), sort_keys=True).encode()).hexdigest()[:16]


def _first_difference(a, b, prefix: str = ""):
    """(dotted key, old value, new value) of the first field where two recipe dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
    return prefix or "recipe", a, b


def _all_finite(tensors) -> bool:
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def _set_aside_bad(learners, from_step: int, start: int) -> str:
    """Rename checkpoints this process wrote at or after ``from_step`` (their weights led to a
    non-finite loss) to ``NNNNNNNN.nonfinite``: kept for inspection, but no longer resumed from,
    so a rerun (with a fixed recipe when none is left) starts from the last good one."""
    moved = []
    for ln in learners:
        for step, p in ln.run.list_checkpoints():
            if step >= from_step and step > start:
                os.replace(p, p.with_name(p.name + ".nonfinite"))
                moved.append(step)
    return f"; checkpoint(s) of step {', '.join(map(str, sorted(set(moved))))} renamed *.nonfinite" if moved else ""


def last_good_text(run: "RunDir", before: int) -> str:
    """'last good checkpoint: PATH' (the newest strictly before step ``before``) or 'no good checkpoint'."""
    good = [p for step, p in run.list_checkpoints() if step < before]
    return f"last good checkpoint: {good[-1]}" if good else "there is no good checkpoint"


# -- data -----------------------------------------------------------------------------------
def open_mixture(stage: Stage):
    from ettin.data.mixture import Mixture

    return Mixture(list(stage.data.sources), seq_len=stage.train.seq_len, seed=stage.train.seed)


def data_model_overrides(mix) -> dict:
    from ettin.data.tokenizer import model_overrides

    return model_overrides(mix.tokenizer_dir)


class Prefetcher:
    """Reads the next step's rows in a background thread while the current step computes."""

    def __init__(self, fetch):
        self.fetch = fetch
        self._key = None
        self._thread = None
        self._result = None

    def _run(self, key):
        try:
            self._result = (key, self.fetch(*key), None)
        except BaseException as e:  # surfaced in get()
            self._result = (key, None, e)

    def prefetch(self, key) -> None:
        self._key = key
        self._thread = threading.Thread(target=self._run, args=(key,), daemon=True)
        self._thread.start()

    def get(self, key):
        if self._thread is not None and self._key == key:
            self._thread.join()
            self._thread = None
            k, val, err = self._result
            if err is not None:
                raise err
            return val
        return self.fetch(*key)


def batch_hash(ids) -> str:
    from ettin.data.mixture import batch_hash as _bh

    return _bh(ids)


def step_generator(seed: int, step: int, objective: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 10 + OBJECTIVE_TAG[objective]) % (2**63 - 1))
    return g


def dropout_seed(seed: int, step: int, objective: str, rank: int) -> int:
    """The torch RNG seed of one learner's step on one rank (it drives attention-output dropout)."""
    h = hashlib.sha256(f"dropout:{seed}:{step}:{objective}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@contextmanager
def step_rng(seed: int, step: int, objective: str, d: D.Dist):
    """The global torch RNG, forked and seeded from (seed, step, objective, rank) for one step.

    Dropout draws from the global RNG. Seeding it per step makes its masks a function of the
    saved trainer state (the step), so a resumed run draws exactly the masks it would have
    drawn, and one side of a pair draws the same masks as when trained alone. The caller's RNG
    state is restored afterwards.
    """
    cuda = d.device.type == "cuda"
    with torch.random.fork_rng(devices=[d.device] if cuda else [], device_type="cuda"):
        torch.manual_seed(dropout_seed(seed, step, objective, d.rank))
        yield


# -- one model --------------------------------------------------------------------------------
class Learner:
    """A model with its optimiser, objective and run directory."""

    def __init__(self, kind: str, run: RunDir, d: D.Dist):
        self.kind = kind
        self.run = run
        self.d = d
        self.model: Transformer | None = None
        self.wrapped: torch.nn.Module | None = None
        self.optim = None
        self.objective = "mlm"
        self.stage: Stage | None = None
        self.tokenizer_dir: Path | None = None
        self._metrics_fh = None
        self._tb = None

    # model/optimiser life cycle
    def attach(self, model: Transformer, stage: Stage) -> None:
        self.model = model.to(self.d.device)
        self.model.attn_impl = stage.model.attn_impl
        self.model.activation_checkpointing = stage.model.activation_checkpointing
        if stage.model.compile is True or (stage.model.compile == "auto" and self.d.device.type == "cuda"):
            self.model.compile_blocks()
        self.wrapped = D.wrap(self.model, stage.distributed.strategy, self.d)
        self.optim = build_optimizer(self.wrapped, stage.optim)

    def configure_stage(self, stage: Stage, objective: str) -> None:
        self.stage = stage
        self.objective = objective
        m = self.model
        m.set_rope_theta(stage.train.rope_theta, stage.train.rope_theta)
        if stage.model.attn_out_dropout is not None:
            m.set_attn_out_dropout(stage.model.attn_out_dropout)
        if stage.train.seq_len > m.config.max_seq_len:
            m.config = m.config.replace(max_seq_len=stage.train.seq_len)

    def checkpoint_meta(self, plan: StepPlan, stage_done: bool) -> dict:
        return {
            "step": plan.step,
            "tokens": plan.tokens_before + plan.tokens,
            "stage": self.stage.name,
            "stage_index": plan.stage_index,
            "stage_step": plan.stage_step,
            "stage_done": stage_done,
            "kind": self.kind,
            "objective": self.objective,
        }

    def save(self, plan: StepPlan, stage_done: bool, data_fingerprint: str) -> Path:
        state = D.full_model_state(self.wrapped, self.d)
        osd = D.full_optim_state(self.wrapped, self.optim, self.d)
        bad = torch.zeros((), device=self.d.device)  # rank 0 holds the gathered state; every rank learns the verdict
        if self.d.is_main and not (_all_finite(state.values()) and _all_finite(v for st in osd["state"].values() for v in st.values())):
            bad += 1
        if self.d.all_reduce_sum(bad).item() > 0:
            raise EttinError(
                f"step {plan.step}: {self.kind} weights or optimizer state are not finite (NaN/Inf) after this step; "
                f"checkpoint not written ({last_good_text(self.run, plan.step)}); try a lower optim.lr or set optim.grad_clip"
            )
        if not self.d.is_main:
            self.d.barrier()
            return self.run.checkpoint_at(plan.step)
        meta = self.checkpoint_meta(plan, stage_done)

        def write_trainer(tmp: Path) -> None:
            tdir = tmp / TRAINER_DIR
            tdir.mkdir()
            tensors, scalars = {}, {}
            for fqn, st in osd["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"{fqn}::{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars[f"{fqn}::{k}"] = v
            groups = []
            for i, g in enumerate(osd["param_groups"]):
                g = dict(g)
                for k, v in list(g.items()):
                    if torch.is_tensor(v):  # e.g. optimi keeps the step count as a tensor
                        tensors[f"param_groups::{i}::{k}"] = v.detach().cpu().contiguous()
                        del g[k]
                groups.append(g)
            save_file(tensors, str(tdir / "optimizer.safetensors"))
            save_file({"torch": torch.get_rng_state()}, str(tdir / "rng.safetensors"))
            doc = {
                **meta,
                "param_groups": groups,
                "optimizer_scalars": scalars,
                "recipe_fingerprint": _fingerprint(self.stage),
                "data_fingerprint": data_fingerprint,
                "next_row": plan.start_row + plan.rows,
                "world_size": self.d.world,
                "dropout_rng": "torch RNG seeded per step from (seed, step, objective, rank)",
                "parallel": (self.stage.distributed.strategy if self.d.enabled else "none"),  # how the model was wrapped
            }
            (tdir / "state.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n")

        path = ckpt.save_checkpoint(
            self.run.checkpoint_at(plan.step),
            None,
            state=state,
            config=self.model.config,
            meta=meta,
            tokenizer_dir=self.tokenizer_dir,
            extra_writer=write_trainer,
        )
        self.d.barrier()
        return path

    def prune(self, keep_step: int) -> None:
        """checkpoint.keep=last: drop older checkpoints (called once every side of a pair saved keep_step)."""
        if not self.d.is_main or self.stage.checkpoint.keep != "last":
            return
        import shutil

        for step, p in self.run.list_checkpoints():
            if step < keep_step:
                if self.tokenizer_dir is not None and Path(self.tokenizer_dir).parent == p:
                    self.tokenizer_dir = self.run.checkpoint_at(keep_step) / ckpt.TOKENIZER_DIR  # the same files
                shutil.rmtree(p, ignore_errors=True)

    def load_optimizer(self, path: Path) -> dict:
        tdir = path / TRAINER_DIR
        doc = json.loads((tdir / "state.json").read_text())
        tensors = load_file(str(tdir / "optimizer.safetensors"))
        state: dict = {}
        groups = [dict(g) for g in doc["param_groups"]]
        for key, v in tensors.items():
            if key.startswith("param_groups::"):
                _, i, k = key.split("::", 2)
                groups[int(i)][k] = v
                continue
            fqn, k = key.split("::", 1)
            state.setdefault(fqn, {})[k] = v
        for key, v in doc.get("optimizer_scalars", {}).items():
            fqn, k = key.split("::", 1)
            state.setdefault(fqn, {})[k] = v
        D.load_full_optim_state(self.wrapped, self.optim, {"state": state, "param_groups": groups}, self.d)
        rng = load_file(str(tdir / "rng.safetensors"))["torch"]
        torch.set_rng_state(rng)
        return doc

    # one optimiser step over this rank's rows of the global batch
    def step(self, plan: StepPlan, ids: torch.Tensor, docs: torch.Tensor) -> dict:
        st = self.stage
        t0 = time.perf_counter()
        inputs, labels = O.make_batch(
            self.objective,
            ids,
            config=self.model.config,
            mask_rate=plan.mask_rate,
            doc_ids=docs,
            generator=step_generator(st.train.seed, plan.step, self.objective),
        )
        n_loss = int((labels != O.IGNORE).sum())
        mine = slice(self.d.rank, None, self.d.world)
        inputs, labels, docs_m = inputs[mine], labels[mine], docs[mine]
        set_lr(self.optim, plan.lr)
        self.wrapped.train()
        mb = st.train.micro_batch
        chunks = list(range(0, inputs.shape[0], mb))
        dev = self.d.device
        use_bf16 = st.train.precision == "bf16" or (st.train.precision == "auto" and dev.type == "cuda")
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        scale = self.d.world / max(1, n_loss)
        with step_rng(st.train.seed, plan.step, self.objective, self.d):  # this step's dropout masks
            for i, c in enumerate(chunks):
                x = inputs[c : c + mb].to(dev, non_blocking=True)
                y = labels[c : c + mb].to(dev, non_blocking=True)
                dm = docs_m[c : c + mb].to(dev, non_blocking=True) if st.train.document_masking else None
                with D.grad_sync(self.wrapped, sync=(i == len(chunks) - 1)), amp:
                    # summed CE over y != -100: sparse prediction + fused, chunked head and loss
                    ce = self.wrapped(x, doc_ids=dm, labels=y)
                    (ce * scale).backward()
                loss_sum += ce.detach()
        if st.optim.grad_clip is not None or not hasattr(torch.nn.utils, "get_total_norm"):  # (torch < 2.6)
            clip = st.optim.grad_clip if st.optim.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), clip)
        else:  # no clipping (the paper's recipe): the norm for the log; clip_grad_norm_(inf) would still multiply every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.wrapped.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        loss = self.d.all_reduce_sum(loss_sum).item() / max(1, n_loss)
        return {"loss": loss, "grad_norm": float(grad_norm), "loss_tokens": n_loss, "step_time": time.perf_counter() - t0}

    # metrics
    def open_metrics(self, resume_step: int) -> None:
        if not self.d.is_main:
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        if self.run.metrics.exists():
            keep = []
            for line in self.run.metrics.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(self.run.metrics, "".join(k + "\n" for k in keep))
        self._metrics_fh = open(self.run.metrics, "a", buffering=1)
        if self.stage is not None and self.stage.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run.root / "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard missing or broken: train on, say so once
                self._tb = None
                _warn_once("tensorboard", f"logging.tensorboard is true but TensorBoard logs cannot be written "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'tensorboard not installed'}); "
                           "metrics.jsonl has every step (pip install tensorboard, or set logging.tensorboard: false)")

    def log(self, rec: dict) -> None:
        if self._metrics_fh is None:
            return
        self._metrics_fh.write(json.dumps(rec, default=_json_default) + "\n")
        if self._tb is not None:
            for k in ("loss", "lr", "batch_size", "grad_norm", "tokens_per_s", "mask_rate", "seq_len"):
                if rec.get(k) is not None:
                    self._tb.add_scalar(f"train/{k}", rec[k], rec["tokens"])

    def close(self) -> None:
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None
        if self._tb is not None:
            self._tb.close()


_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


# -- model construction -----------------------------------------------------------------------
def _causal_for(objective: str) -> bool:
    return objective == "clm"


def new_model(stage: Stage, kind: str, objective: str, mix, seed: int) -> tuple[Transformer, Path | None]:
    """The model a run starts from: random init, or weights from ``model.init_from``."""
    tok = mix.tokenizer_dir
    data_over = data_model_overrides(mix)
    causal = _causal_for(objective)
    src = stage.model.init_from
    if src:
        if src == "previous":
            raise EttinError(f"stage '{stage.name}': model.init_from 'previous' needs a previous stage in this run")
        side = Path(src) / kind if (Path(src) / kind).is_dir() and not ckpt.is_checkpoint(src) else Path(src)
        path = last_checkpoint(side)
        model = ckpt.load_model(path)
        c = model.config
        if c.causal != causal or c.objective != objective:
            origin = f"{c.kind} ({c.objective}) -> {objective} from {path}"
            model.set_causal(causal, objective=objective, origin=origin)
        check_vocab(model.config, data_over, path, mix)
        return model, ckpt.tokenizer_dir(path) or tok
    overrides = dict(data_over)
    if stage.model.vocab_size is not None:
        if stage.model.vocab_size < data_over["vocab_size"]:
            raise EttinError(f"model.vocab_size {stage.model.vocab_size} is smaller than the data tokenizer's vocabulary ({data_over['vocab_size']})")
        overrides["vocab_size"] = stage.model.vocab_size
    overrides.update(stage.model.overrides or {})
    overrides.update(rope_theta_global=stage.train.rope_theta, rope_theta_local=stage.train.rope_theta)
    overrides["max_seq_len"] = max(8192, stage.train.seq_len)
    try:
        cfg = preset(stage.model.size, causal=causal, objective=objective, **overrides)
    except TypeError as e:
        raise EttinError(f"model.overrides: {e}") from None
    torch.manual_seed(seed)
    return Transformer(cfg), tok


def check_vocab(cfg: ModelConfig, data_over: dict, where, mix) -> None:
    if cfg.vocab_size < data_over["vocab_size"] or any(getattr(cfg, k) != data_over[k] for k in ("cls_id", "sep_id", "pad_id", "mask_id")):
        raise EttinError(
            f"{where}: the model's vocabulary ({cfg.vocab_size} tokens, mask id {cfg.mask_id}) does not match the data tokenizer "
            f"at {mix.tokenizer_dir} ({data_over['vocab_size']} tokens, mask id {data_over['mask_id']})"
        )


# -- the loop ---------------------------------------------------------------------------------
def train(recipe: str | Path, out: str | Path, **kw) -> dict:
    """Train (or resume) one model or a lockstep pair; returns a summary dict.

    The run directory is locked for the whole run (one writer; see :mod:`ettin.lock`); a run
    that fails before writing anything leaves no directory behind.
    """
    from ettin.lock import LOCK_FILE, run_lock
    from ettin.safety import check_parent

    load_recipe(recipe, kw.get("overrides"))  # a bad recipe or --set fails before anything is created
    out = Path(out)
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise EttinError(f"{out}: exists and is a file; --out takes a run directory")
    created = not out.exists()
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        with run_lock(out, enabled=main):
            from ettin.fsutil import remove_stale_tmp

            for sub in (out, out / "checkpoints", out / "encoder", out / "encoder" / "checkpoints", out / "decoder", out / "decoder" / "checkpoints"):
                remove_stale_tmp(sub)  # leftovers of a killed run (we hold the lock: no other writer)
            return _train(recipe, out, **kw)
    except BaseException:
        if created and main and out.is_dir() and _nothing_written(out, LOCK_FILE):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _nothing_written(out: Path, lock_file: str) -> bool:
    """A run directory this call created holds nothing of value: no checkpoint, no metric line."""
    for p in out.rglob("*"):
        if p.is_dir() or p.name in (lock_file, "recipe.yaml", "plan.json"):  # both derived from the recipe
            continue
        if p.name == "metrics.jsonl" and p.stat().st_size == 0:
            continue
        return False
    return True


def _train(
    recipe: str | Path,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    pair: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    kind: str | None = None,
) -> dict:
    stages = load_recipe(recipe, overrides)
    if kind is not None:
        stages = [replace(s, model=replace(s.model, kind=kind)) for s in stages]
    stages = budget.resolve_samples(stages, open_mixture)  # train.tokens_per_sample: auto -> tokens
    d = D.init(stages[0].train.device, stages[0].distributed.backend)
    clean = False
    try:
        result = _train_in(stages, d, out, pair=pair, max_steps=max_steps, progress=progress)
        clean = True
        return result
    finally:
        D.shutdown(d, clean)


def _train_in(stages: list[Stage], d: D.Dist, out: str | Path, *, pair: bool, max_steps: int | None, progress: bool) -> dict:
    if d.device.type == "cpu":
        from ettin.model.cpu import tune_cpu_allocator

        tune_cpu_allocator()  # reuse freed activations instead of page-faulting them back in
    out = Path(out)
    if pair:
        for s in stages:
            if s.train.objective not in (None,):
                raise EttinError(f"stage '{s.name}': 'train.objective' must be unset for 'ettin pair' (encoder MLM, decoder CLM)")
        sides = [("encoder", RunDir(out / "encoder")), ("decoder", RunDir(out / "decoder"))]
    else:
        sides = [(stages[0].model.kind, RunDir(out))]

    # the run's stage list (existing + requested) and the shared plan
    run_stages = {}
    for k, run in sides:
        side_stages = [replace(s, model=replace(s.model, kind=k)) for s in stages]
        run_stages[k] = merge_run_recipe(run, side_stages)
    first = run_stages[sides[0][0]]
    plan = Plan(first)
    total = plan.total_steps()
    stage_plan = plan.stage_summary()  # steps and tokens per step of each stage, printed and saved
    stop_at = total if max_steps is None else min(total, max_steps)

    # where to start: the last checkpoint common to all sides
    learners = [Learner(k, run, d) for k, run in sides]
    common = set.intersection(*[{step for step, _ in ln.run.list_checkpoints()} for ln in learners])
    start = max(common) if common else 0  # a pair resumes in lockstep from the last step both sides saved

    mixes: dict[int, object] = {}

    def mix_for(si: int):
        if si not in mixes:
            mixes[si] = open_mixture(first[si])
        return mixes[si]

    # build/restore models
    cur_stage_index = 0
    for ln in learners:
        st_list = run_stages[ln.kind]
        if start > 0:
            path = ln.run.checkpoint_at(start)
            state = json.loads((path / TRAINER_DIR / "state.json").read_text())
            cur_stage_index = si = state["stage_index"]
            stage = st_list[si]
            if state.get("recipe_fingerprint") != _fingerprint(stage):
                raise EttinError(f"{path}: the recipe of stage '{stage.name}' changed since this checkpoint; use a new --out")
            model = ckpt.load_model(path)
            ln.tokenizer_dir = ckpt.tokenizer_dir(path)
            ln.attach(model, stage)
            ln.configure_stage(stage, model.config.objective)
            ln.load_optimizer(path)
            if state.get("data_fingerprint") != mix_for(si).fingerprint:
                raise EttinError(f"{path}: the data of stage '{stage.name}' changed since this checkpoint (fingerprint differs)")
        else:
            stage = st_list[0]
            if pair:
                objective = "mlm" if ln.kind == "encoder" else "clm"
            else:
                objective = stage.objective
            model, tok = new_model(stage, ln.kind, objective, mix_for(0), stage.train.seed)
            ln.tokenizer_dir = tok
            ln.attach(model, stage)
            ln.configure_stage(stage, objective)
        check_vocab(ln.model.config, data_model_overrides(mix_for(cur_stage_index)), ln.run.root, mix_for(cur_stage_index))

    if d.is_main:
        for ln in learners:
            ln.run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(ln.run.recipe, stages_to_yaml(run_stages[ln.kind]))
            ln.open_metrics(start)
        if pair:
            atomic_write_text(out / "recipe.yaml", stages_to_yaml(first))
        for root in {out} | {ln.run.root for ln in learners}:
            budget.write_plan(root / "plan.json", stage_plan)
        if progress:
            for line in budget.plan_lines(stage_plan):
                print(f"plan {line}", flush=True)

    if start >= stop_at:
        for ln in learners:
            ln.close()
        return {"steps": start, "resumed_from": start, "finished": start >= total, "runs": [str(ln.run.root) for ln in learners], "plan": stage_plan}

    nparams = learners[0].model.num_params()
    peak = first[0].logging.peak_flops or _device_peak(d.device)
    bar = _Progress(enabled=progress and d.is_main, total=stop_at, start=start, label=Path(out).name)

    pin = d.device.type == "cuda"
    vocab = min(ln.model.config.vocab_size for ln in learners)

    def fetch(si: int, row: int, n: int):
        """Rows of the global batch, read from the memmaps (and pinned for a fast copy to the GPU)."""
        ids, docs = mix_for(si).rows(row, n)
        if ids.size and int(ids.max()) >= vocab:  # cheap; the full check is 'ettin data verify'
            raise EttinError(f"data of stage '{first[si].name}': token id {int(ids.max())} is outside the model's vocabulary of {vocab} (corrupt shard? run 'ettin data verify')")
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        docs = torch.from_numpy(np.ascontiguousarray(docs).astype(np.int64))
        return (ids.pin_memory(), docs.pin_memory()) if pin else (ids, docs)

    pre = Prefetcher(fetch)
    first_losses = {ln.kind: None for ln in learners}
    last = {}
    t_prev = time.perf_counter()
    try:
        for step in range(start + 1, stop_at + 1):
            p = plan.get(step)
            if p.stage_index != cur_stage_index:
                for ln in learners:
                    _enter_stage(ln, run_stages[ln.kind][p.stage_index])
                    check_vocab(ln.model.config, data_model_overrides(mix_for(p.stage_index)), ln.run.root, mix_for(p.stage_index))
                cur_stage_index = p.stage_index
            key = (p.stage_index, p.start_row, p.rows)
            ids, docs = pre.get(key)
            nxt = plan.get(step + 1)
            if nxt is not None and step + 1 <= stop_at:
                pre.prefetch((nxt.stage_index, nxt.start_row, nxt.rows))
            if p.rows % d.world:
                raise EttinError(
                    f"step {step}: batch of {p.rows} sequences does not split over {d.world} processes; make train.global_batch, "
                    "train.batch_warmup_start and train.batch_multiple multiples of the world size"
                )
            faults.point("train-step")
            bh = batch_hash(ids)
            results = {}
            for ln in learners:
                if batch_hash(ids) != bh:
                    raise EttinError(f"step {step}: {ln.kind} would train on a different batch than its pair ({bh})")
                try:
                    r = ln.step(p, ids, docs)
                except torch.OutOfMemoryError:
                    st = ln.stage.train
                    raise EttinError(
                        f"step {step}: {ln.kind} ran out of GPU memory (micro_batch {st.micro_batch} x seq_len {st.seq_len}); "
                        "lower train.micro_batch (the global batch stays the same) or set model.activation_checkpointing=true"
                    ) from None
                if not math.isfinite(r["loss"]):
                    # the loss of step s comes from the weights after step s-1: a checkpoint there is not good
                    where = last_good_text(ln.run, step - 1)
                    moved = _set_aside_bad(learners, step - 1, start) if d.is_main else ""
                    raise EttinError(f"step {step}: {ln.kind} loss is {r['loss']}; run stopped ({where}{moved}); try a lower optim.lr or optim.grad_clip")
                results[ln.kind] = r
            now = time.perf_counter()
            dt = now - t_prev
            t_prev = now
            tok_s = p.tokens / dt if dt > 0 else None
            gpu_peak = None  # the step's peak allocated GPU memory (this process), for sizing runs
            if d.device.type == "cuda":
                gpu_peak = round(torch.cuda.max_memory_allocated(d.device) / 2**30, 3)
                torch.cuda.reset_peak_memory_stats(d.device)
            hashes = {}
            for ln in learners:
                r = results[ln.kind]
                if first_losses[ln.kind] is None:
                    first_losses[ln.kind] = r["loss"]
                rec = {
                    "step": step,
                    "tokens": p.tokens_before + p.tokens,
                    "stage": ln.stage.name,
                    "kind": ln.kind,
                    "objective": ln.objective,
                    "loss": r["loss"],
                    "lr": p.lr,
                    "batch_size": p.rows,
                    "samples": p.samples,
                    "seq_len": p.seq_len,
                    "mask_rate": p.mask_rate if ln.objective != "clm" else 0.0,
                    "grad_norm": r["grad_norm"],
                    "loss_tokens": r["loss_tokens"],
                    "tokens_per_s": tok_s,
                    "mfu": (6 * nparams * tok_s * len(learners) / peak) if (peak and tok_s) else None,
                    "batch_hash": bh,
                    "gpu_memory_gib": gpu_peak,
                    "time": time.time(),
                }
                hashes[ln.kind] = rec["batch_hash"]
                ln.log(rec)
                last[ln.kind] = rec
            if len(set(hashes.values())) > 1:
                raise EttinError(f"step {step}: encoder and decoder saw different batches {hashes}")
            stage_end = step == plan.stage_last_step(p.stage_index)
            every = first[p.stage_index].checkpoint.every_tokens
            crossed = (p.tokens_before + p.tokens) // every > p.tokens_before // every
            if crossed or stage_end or step == stop_at:
                fp = mix_for(p.stage_index).fingerprint
                for i, ln in enumerate(learners):
                    ln.save(p, stage_end, fp)
                    if i + 1 < len(learners):
                        faults.point("between-pair-saves")
                for ln in learners:  # only now: until every side has step p, each keeps the last common one
                    ln.prune(p.step)
            bar.update(step, {k: r["loss"] for k, r in results.items()}, tok_s, first[p.stage_index].name,
                       mfu=rec["mfu"], gpu_gib=gpu_peak)
    finally:
        bar.close()
        for ln in learners:
            ln.close()
    return {
        "steps": stop_at,
        "resumed_from": start,
        "finished": stop_at >= total,
        "first_loss": first_losses,
        "last": last,
        "runs": [str(ln.run.root) for ln in learners],
        "plan": stage_plan,
    }


def _enter_stage(ln: Learner, stage: Stage) -> None:
    """Stage change: new sequence length, RoPE theta, mask rate and data; optimiser kept unless told."""
    src = stage.model.init_from
    if src not in (None, "previous"):
        raise EttinError(f"stage '{stage.name}': a later stage continues from the previous one; set model.init_from to 'previous' or leave it empty")
    ln.configure_stage(stage, ln.objective)
    if not stage.model.load_optimizer:
        ln.optim = build_optimizer(ln.wrapped, stage.optim)


def _device_peak(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key, val in PEAK_FLOPS.items():
        if key in name:
            return val
    return None


class _Progress:
    """The training bar (ettin.progress): loss, tokens/s and ETA on a terminal; plain lines at
    least every $ETTIN_PROGRESS_INTERVAL seconds elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int, label: str = "train"):
        from ettin.progress import progress

        self.label = label
        self._p = progress(total, label, "steps", quiet=None if enabled else True, completed=start).start()

    def update(self, step: int, losses: dict, tok_s: float | None, stage: str, mfu: float | None = None,
               gpu_gib: float | None = None) -> None:
        loss = " ".join(f"{k[:3]} {v:.3f}" for k, v in losses.items())
        info = {"loss": loss, "tok/s": f"{tok_s / 1000:.1f}k" if tok_s else None,
                "MFU": f"{100 * mfu:.0f}%" if mfu else None, "GiB": f"{gpu_gib:.1f}" if gpu_gib else None}
        self._p.update(completed=step, desc=f"{self.label} {stage}", **info)

    def close(self) -> None:
        self._p.close()


# -- batch inspection -------------------------------------------------------------------------
def run_stages_of(run: Path) -> tuple[list[Stage], Path]:
    """The resolved stages of a run (a pair run's encoder/decoder share them)."""
    run = Path(run)
    for cand in (run / "recipe.yaml", run / "encoder" / "recipe.yaml"):
        if cand.is_file():
            raw = yaml.safe_load(cand.read_text()) or {}
            return [stage_from_dict(d, str(cand)) for d in raw.get("stages", [])], cand
    raise EttinError(f"{run}: not a run directory (no recipe.yaml)")


def batch_at(run: Path, step: int) -> dict:
    """Exactly the tokens of global batch ``step`` of a run, recomputed from recipe and data."""
    stages, src = run_stages_of(run)
    plan = Plan(stages)
    p = plan.get(step)
    if p is None:
        raise EttinError(f"{src}: step {step} is outside the run (1..{plan.total_steps()})")
    mix = open_mixture(stages[p.stage_index])
    ids, docs = mix.rows(p.start_row, p.rows)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return {"step": step, "stage": stages[p.stage_index].name, "start_row": p.start_row, "input_ids": ids, "doc_ids": docs, "batch_hash": batch_hash(ids), "mix": mix}


def env_threads() -> None:
    """Respect OMP_NUM_THREADS; otherwise use the cores torch sees."""
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
