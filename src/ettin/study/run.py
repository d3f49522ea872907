"""Run a study plan unit by unit; a finished unit (its fingerprint on disk) is never recomputed.

A unit directory is marked done by ``unit.json`` (written atomically, last); an evaluation unit
is one JSON file written atomically. A unit directory found with another fingerprint is stale
(its inputs changed) and is rebuilt; one with the same fingerprint but no marker was cut short
and resumes (training continues from its last checkpoint). Every finished unit appends one line
to ``DIR/study-log.jsonl`` (what ran, how long), which the ETA reads.
"""

from __future__ import annotations

import datetime
import gzip
import inspect
import json
import os
import shutil
import time
from pathlib import Path

from ettin.errors import EttinError
from ettin.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from ettin.study.plan import CONVERSIONS, StudyConfig, StudyPlan, Unit, build_plan

CONFIG_FILE = "study-config.json"
LOG_FILE = "study-log.jsonl"
FP_FILE = ".fingerprint"


# -- progress (one function, so a progress-bar module can replace it) -------------------------------
def report_progress(plan: StudyPlan, current: Unit | None, log: list[dict], echo=print, done_names: set | None = None) -> str:
    """One line: the unit running, units done/remaining, ETA from this study's own timings."""
    if done_names is None:
        done_names = {u.name for u in plan.units if u.done()}
    done = [u for u in plan.units if u.name in done_names]
    todo = [u for u in plan.units if u.name not in done_names]
    eta = estimate_seconds(todo, log)
    eta_s = "unknown" if eta is None else _hms(eta)
    kinds = {}
    for u in todo:
        kinds[u.kind] = kinds.get(u.kind, 0) + 1
    rest = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "nothing"
    now = f"running {current.name} | " if current is not None else ""
    line = f"[study] {now}{len(done)}/{len(plan.units)} units done; left: {rest}; ETA {eta_s}"
    if echo is not None:
        echo(line)
    return line


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def estimate_seconds(todo: list[Unit], log: list[dict]) -> float | None:
    """Remaining seconds: training by this study's measured seconds per token, evaluation by the
    mean time of the same task so far, anything else by its kind's mean. None before any timing."""
    if not todo:
        return 0.0
    per_token = [r["seconds"] / r["cost"] for r in log if r.get("kind") in ("train", "convert") and r.get("cost")]
    by_task: dict[str, list[float]] = {}
    by_kind: dict[str, list[float]] = {}
    for r in log:
        by_kind.setdefault(r["kind"], []).append(r["seconds"])
        if r.get("task"):
            by_task.setdefault(r["task"], []).append(r["seconds"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    total, known = 0.0, False
    for u in todo:
        if u.kind in ("train", "convert") and per_token:
            total += mean(per_token) * u.cost
            known = True
        elif u.kind == "eval" and u.task in by_task:
            total += mean(by_task[u.task])
            known = True
        elif u.kind in by_kind:
            total += mean(by_kind[u.kind])
            known = True
    return total if known else None


def read_log(out: Path) -> list[dict]:
    path = Path(out) / LOG_FILE
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


def _append_log(out: Path, rec: dict) -> None:
    with open(Path(out) / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# -- unit directories ---------------------------------------------------------------------------------
def _open_unit_dir(u: Unit) -> bool:
    """Make ``u.path`` ready to (re)start; True when it resumes an interrupted attempt."""
    fp = u.path / FP_FILE
    if u.path.exists():
        try:
            same = fp.read_text().strip() == u.fingerprint
        except OSError:
            same = False
        if same:
            return True
        shutil.rmtree(u.path)  # stale: built from other inputs (or cut short before it began)
    return False


def _begin(u: Unit) -> None:
    u.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(u.path / FP_FILE, u.fingerprint + "\n")


def _finish(u: Unit, extra: dict | None = None) -> dict:
    rec = {"unit": u.name, "fingerprint": u.fingerprint,
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    atomic_write_json(u.marker, rec)
    return rec


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a finished run directory's checkpoints (copy the small mutable files)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            s, d = Path(root) / f, dst / rel / f
            if f.startswith("."):
                continue
            if rel == Path(".") and f in ("metrics.jsonl", "recipe.yaml", "eval.jsonl"):
                shutil.copy2(s, d)
                continue
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


# -- unit bodies -------------------------------------------------------------------------------------
def run_data(plan: StudyPlan, u: Unit, progress: bool) -> dict:
    from ettin.data.prepare import prepare
    from ettin.data.tokenizer import train_tokenizer

    from ettin.demo import _read_corpus

    _open_unit_dir(u)
    _begin(u)
    texts = [t for p in plan.pretrain for t in _read_corpus(p)]
    tok = u.path / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(iter(texts), tok, plan.config.vocab_size, sources=[str(p) for p in plan.pretrain])
    man = prepare(plan.pretrain, tok, u.path / "shards", name="study", workers=2, overwrite=True, progress=progress)
    if u.inputs.get("heldout"):
        from ettin.data import demo_heldout_path
        from ettin.demo import _passages

        passages = _passages(_read_corpus(demo_heldout_path()), 48)
        atomic_write_text(u.path / "evaldata" / "lm" / "heldout" / "validation.jsonl",
                          "".join(json.dumps({"text": t}) + "\n" for t in passages))
    return {"tokens": man.get("tokens"), "documents": man.get("documents")}


def run_train(plan: StudyPlan, u: Unit, progress: bool) -> dict:
    from ettin.train.recipe import stages_to_yaml
    from ettin.train.trainer import train

    k = u.inputs["index"]
    stages = plan.stages[u.size][: k + 1]
    if not _open_unit_dir(u):
        u.path.mkdir(parents=True, exist_ok=True)
        if k > 0:  # continue from the previous stage's finished run (optimizer state included)
            prev = plan.by_name[u.deps[-1]]
            for side in ("encoder", "decoder"):
                _link_tree(prev.path / side, u.path / side)
        _begin(u)
    recipe = u.path / "study-recipe.yaml"
    atomic_write_text(recipe, stages_to_yaml(stages))
    res = train(recipe, u.path, pair=True, progress=progress)
    if not res["finished"]:
        raise EttinError(f"{u.path}: training stopped before the end of {stages[-1].name}")
    _check_checkpoints(plan, u, ("encoder", "decoder"))
    return {"last": {k2: v.get("loss") for k2, v in (res.get("last") or {}).items()}}


def run_convert(plan: StudyPlan, u: Unit, progress: bool) -> dict:
    from ettin.convert.objective import convert
    from ettin.train.recipe import stages_to_yaml

    src_side, objective = CONVERSIONS[u.model]
    source = plan.by_name[u.deps[0]].path / src_side
    if not _open_unit_dir(u):
        _begin(u)
    recipe = u.path / "study-recipe.yaml"
    atomic_write_text(recipe, stages_to_yaml([plan.cross[u.size]]))
    res = convert(source, objective, recipe, u.path, progress=progress)
    if not res["finished"]:
        raise EttinError(f"{u.path}: conversion stopped before its end")
    _check_checkpoints(plan, u, (u.model,))
    return {"last": {k: v.get("loss") for k, v in (res.get("last") or {}).items()}}


def _check_checkpoints(plan: StudyPlan, u: Unit, models: tuple[str, ...]) -> None:
    """The checkpoints the plan predicted (and will evaluate) must be the ones written."""
    for ln in plan.lines:
        if ln.size != u.size or ln.name not in models:
            continue
        missing = [s for s, prod, _ in ln.checkpoints if prod == u.name and not checkpoint_path(plan, ln.name, prod, s).is_dir()]
        if missing:
            raise EttinError(f"{u.path}: expected checkpoints at steps {missing} (the study's plan) were not written")


def checkpoint_path(plan: StudyPlan, model: str, producer: str, step: int) -> Path:
    prod = plan.by_name[producer]
    root = prod.path / model if prod.kind == "train" else prod.path
    return root / "checkpoints" / f"{step:08d}"


def run_export(plan: StudyPlan, u: Unit, progress: bool) -> dict:
    from ettin.convert.hf import export_checkpoint

    ln = plan.line(u.size, u.model)
    step, prod, _ = ln.checkpoints[-1]
    ck = checkpoint_path(plan, ln.name, prod, step)
    _open_unit_dir(u)
    _begin(u)
    export_checkpoint(ck, u.path / "hf", force=True)
    return {"checkpoint": str(ck)}


# -- evaluation ----------------------------------------------------------------------------------------
def eval_data_dir(plan: StudyPlan) -> Path:
    return plan.data_dir if plan.data_dir is not None else plan.by_name["data"].path / "evaldata"


def prepare_tasks(plan: StudyPlan):
    """Read and check every task's files once (before any slow work)."""
    from ettin.eval.api import make_options, prepare

    opts = make_options(**plan.config.eval)
    data_dir = eval_data_dir(plan)
    if plan.data_dir is None and not data_dir.is_dir():
        return opts, None  # the held-out text is written by the data unit; read after it
    names = [f"lm/{t}" if plan.data_dir is None else t for t in plan.tasks]
    prepared = prepare(names, data_dir, "validation", opts)
    return opts, {spec.name: (spec, data) for spec, data in prepared}


def _supports_samples() -> bool:
    from ettin.eval import api

    return "samples" in inspect.signature(api.run_prepared).parameters


def run_task(em, spec, data, opts) -> tuple[dict, list[dict]]:
    """One task on one model, with its per-example samples when the evaluator gives them."""
    from ettin.eval.api import run_prepared

    samples: list[dict] = []
    if _supports_samples():
        res = run_prepared(em, [(spec, data)], opts, samples=samples)[spec.name]
    else:
        res = run_prepared(em, [(spec, data)], opts)[spec.name]
    return res, samples


def _bootstrap_seed(cfg: StudyConfig, task: str) -> int:
    import hashlib

    return (cfg.seed * 1_000_003 + int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)) % (2**31)


def samples_path(u: Unit) -> Path:
    return u.path.with_name(u.path.stem + ".samples.jsonl.gz")


def read_samples(u: Unit) -> list[dict]:
    p = samples_path(u)
    if not p.is_file():
        return []
    with gzip.open(p, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_eval_group(plan: StudyPlan, group: list[Unit], opts, prepared, progress: bool, on_done) -> None:
    """Every pending task of one checkpoint with the model loaded once."""
    from ettin.eval.commands import _clean
    from ettin.eval.loading import load_for_eval
    from ettin.study.stats import task_intervals

    u0 = group[0]
    ln = plan.line(u0.size, u0.model)
    prod = dict((s, p) for s, p, _ in ln.checkpoints)[u0.step]
    ck = checkpoint_path(plan, ln.name, prod, u0.step)
    em = load_for_eval(ck, opts.device)[0]
    tokens = (em.tokens or 0) + ln.base_tokens
    try:
        for u in group:
            t0 = time.perf_counter()
            key = f"lm/{u.task}" if plan.data_dir is None else u.task
            spec, data = prepared[spec_key(prepared, key)]
            res, samples = run_task(em, spec, data, opts)
            seconds = time.perf_counter() - t0
            cis = task_intervals(res, samples, n_boot=plan.config.n_boot, seed=_bootstrap_seed(plan.config, u.task)) if samples else {}
            if samples:
                blob = "".join(json.dumps(_clean(s)) + "\n" for s in samples).encode("utf-8")
                atomic_write_bytes(samples_path(u), gzip.compress(blob, mtime=0))
            rec = _finish(u, {"model": ln.label, "size": ln.size, "step": u.step, "tokens": tokens, "task": u.task,
                              "checkpoint": str(ck), "result": _clean(res), "intervals": _clean(cis),
                              "samples": len(samples), "seconds": round(seconds, 3)})
            on_done(u, rec, seconds)
    finally:
        em.release()


def spec_key(prepared: dict, key: str) -> str:
    if key in prepared:
        return key
    short = key.split("/", 1)[-1]
    if short in prepared:
        return short
    raise EttinError(f"task '{key}' was not prepared")


# -- the study -----------------------------------------------------------------------------------------
RUNNERS = {"data": run_data, "train": run_train, "convert": run_convert, "export": run_export}


def save_config(cfg: StudyConfig) -> None:
    atomic_write_json(Path(cfg.out) / CONFIG_FILE, cfg.to_json())


def load_config(out: Path) -> StudyConfig:
    p = Path(out) / CONFIG_FILE
    if not p.is_file():
        raise EttinError(f"{out}: not a study directory (no {CONFIG_FILE}; run 'ettin study ... --out {out}' first)")
    try:
        return StudyConfig.from_json(json.loads(p.read_text()))
    except (ValueError, TypeError) as e:
        raise EttinError(f"{p}: unreadable study configuration ({e})") from None


def run_study(cfg: StudyConfig, *, progress: bool = True, echo=print, stop_after: int | None = None) -> dict:
    """Run (or continue) the study; returns the summary of ``collect``. ``stop_after``: stop
    after that many units have run in this call (tests use it to simulate an interruption)."""
    from ettin.train.trainer import env_threads

    from ettin.eval.loading import check_device

    plan = build_plan(cfg)  # bad input fails here, before any work
    opts, prepared = prepare_tasks(plan)
    check_device(opts.device)  # e.g. the gpu preset on a machine without CUDA
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg)
    env_threads()
    log = read_log(out)
    ran = 0
    t_start = time.time()

    cpu_mark = [time.process_time()]

    def logged(u: Unit, seconds: float, extra: dict | None = None) -> None:
        nonlocal ran
        now = time.process_time()  # CPU seconds of this process (all threads) since the last unit
        rec = {"unit": u.name, "kind": u.kind, "fingerprint": u.fingerprint, "seconds": round(seconds, 3),
               "cpu_seconds": round(now - cpu_mark[0], 3), "cost": u.cost, "task": u.task, "time": time.time()}
        cpu_mark[0] = now
        _append_log(out, rec)
        log.append(rec)
        ran += 1

    done = {v.name for v in plan.units if v.done()}  # read once; units add themselves when they finish
    last = None
    while True:
        u = next((v for v in plan.units if v.name not in done), None)
        if u is None:
            break
        if u.name == last:
            raise EttinError(f"{u.marker}: unit '{u.name}' ran but is not marked done")
        last = u.name
        if stop_after is not None and ran >= stop_after:
            return {"stopped": True, "ran": ran}
        if u.kind == "eval":
            if prepared is None:
                opts, prepared = prepare_tasks(plan)
            group = [v for v in plan.units if v.kind == "eval" and v.size == u.size and v.model == u.model
                     and v.step == u.step and v.name not in done]
            if stop_after is not None:
                group = group[: max(1, stop_after - ran)]
            report_progress(plan, u, log, echo, done)
            cpu_mark[0] = time.process_time()
            run_eval_group(plan, group, opts, prepared, progress, lambda v, rec, s: (logged(v, s), done.add(v.name)))
            continue
        report_progress(plan, u, log, echo, done)
        cpu_mark[0] = time.process_time()
        t0 = time.perf_counter()
        extra = RUNNERS[u.kind](plan, u, progress)
        seconds = time.perf_counter() - t0
        _finish(u, {"seconds": round(seconds, 3), **(extra or {})})
        logged(u, seconds)
        done.add(u.name)
        if plan.provisional and u.kind == "data":
            plan = build_plan(cfg)  # steps measured on the prepared data: the exact checkpoints
            done = {v.name for v in plan.units if v.done()}
    report_progress(plan, None, log, echo, done)
    from ettin.study.report import collect, write_study_report

    summary = collect(plan)
    write_study_report(plan, summary)
    summary["seconds_this_call"] = round(time.time() - t_start, 1)
    return summary


def status(out: Path, echo=print) -> dict:
    """What is done and what is left, without running anything."""
    cfg = load_config(out)
    plan = build_plan(cfg)
    log = read_log(Path(out))
    line = report_progress(plan, None, log, echo=None)
    pending = [u for u in plan.units if not u.done()]
    nxt = pending[0].name if pending else None
    if echo is not None:
        echo(line.replace("[study] ", f"[study] {out}: ", 1))
        if nxt:
            echo(f"[study] next: {nxt}")
        spent = sum(r["seconds"] for r in log)
        cpu = sum(r.get("cpu_seconds") or 0.0 for r in log)
        echo(f"[study] time spent in finished units: {_hms(spent)} wall, {_hms(cpu)} CPU")
    return {"done": len(plan.units) - len(pending), "total": len(plan.units), "next": nxt,
            "eta_seconds": estimate_seconds(pending, log)}
