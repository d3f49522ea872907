"""`ettin study`: bootstrap statistics, the unit plan and its fingerprints, resume after a kill,
reruns of only what a changed recipe value touches, the JSON and report it writes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import demo_texts

from ettin.errors import EttinError
from ettin.study import stats
from ettin.study.plan import (
    PRESETS,
    build_plan,
    make_config,
    measured_stages,
    predicted_checkpoints,
)


# -- bootstrap ------------------------------------------------------------------------------------------
def _mc_samples(correct, task="t", seed=None, prefix="q"):
    return [{"task": task, "id": f"{prefix}{i}", "label": 0, "prediction": 0 if c else 1,
             "metrics": {"acc": float(c)}, **({"seed": seed} if seed is not None else {})} for i, c in enumerate(correct)]


def test_bootstrap_mean_matches_the_normal_interval_and_is_reproducible():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.7).astype(float)
    lo, hi = stats.bootstrap_mean(x, n_boot=2000, seed=3)
    se = math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert lo < x.mean() < hi
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.15 * 2 * 1.96 * se
    assert stats.bootstrap_mean(x, n_boot=2000, seed=3) == [lo, hi]
    assert stats.bootstrap_mean(x, n_boot=2000, seed=4) != [lo, hi]


def test_interval_of_a_task_metric():
    correct = [1] * 30 + [0] * 10
    iv = stats.interval(_mc_samples(correct), "acc", n_boot=1000, seed=0)
    assert iv["value"] == pytest.approx(0.75) and iv["n"] == 40 and iv["seeds"] == 0
    lo, hi = iv["ci"]
    assert lo <= 0.75 <= hi and hi - lo > 0.1
    assert stats.interval(_mc_samples(correct), "acc", n_boot=1000, seed=0) == iv
    # all equal: a zero-width interval; an unknown metric: no interval
    assert stats.interval(_mc_samples([1] * 10), "acc")["ci"] == [1.0, 1.0]
    assert stats.interval(_mc_samples(correct), "nope") is None


def test_perplexity_is_recomputed_from_summed_nll_over_tokens():
    nll, tok = [2.0, 9.0, 3.0], [4, 10, 2]
    samples = [{"task": "w", "id": str(i), "nll": a, "tokens": b, "metrics": {"perplexity": math.exp(a / b)}}
               for i, (a, b) in enumerate(zip(nll, tok))]
    iv = stats.interval(samples, "perplexity", n_boot=500)
    assert iv["value"] == pytest.approx(math.exp(sum(nll) / sum(tok)))
    assert iv["ci"][0] <= iv["value"] <= iv["ci"][1]
    bpb = [dict(x, bytes=b * 3) for x, b in zip(samples, tok)]
    assert stats.interval(bpb, "bits_per_byte")["value"] == pytest.approx(sum(nll) / (3 * sum(tok)) / math.log(2))
    # LAMBADA: per-example nll only, perplexity = exp(mean nll)
    lam = [{"task": "l", "id": str(i), "metrics": {"acc": 0.0, "nll": a}} for i, a in enumerate(nll)]
    assert stats.interval(lam, "perplexity")["value"] == pytest.approx(math.exp(sum(nll) / 3))


def test_corpus_metrics_from_labels_and_predictions():
    from ettin.eval.metrics import f1_binary, matthews_corrcoef

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).tolist()
    p = [v if rng.random() < 0.8 else 1 - v for v in y]
    samples = [{"task": "cola", "id": str(i), "label": a, "prediction": b, "metrics": {"accuracy": float(a == b)}}
               for i, (a, b) in enumerate(zip(y, p))]
    assert stats.interval(samples, "matthews_corrcoef")["value"] == pytest.approx(matthews_corrcoef(p, y))
    assert stats.interval(samples, "f1")["value"] == pytest.approx(f1_binary(p, y))
    iv = stats.interval(samples, "matthews_corrcoef")
    assert iv["ci"][0] < iv["value"] < iv["ci"][1]


def test_seeds_times_bootstrap():
    rng = np.random.default_rng(2)
    base = (rng.random(100) < 0.6).astype(int).tolist()
    same = [s for seed in (0, 1, 2) for s in _mc_samples(base, seed=seed)]
    one = stats.interval(_mc_samples(base), "acc", seed=5)
    three = stats.interval(same, "acc", seed=5)
    assert three["seeds"] == 3 and three["n"] == 100
    assert three["ci"] == pytest.approx(one["ci"])  # identical seeds add no spread
    # seeds that disagree widen the interval, and the value is the mean over seeds
    varied = []
    for seed in (0, 1, 2):
        flip = rng.random(100) < 0.25
        varied += _mc_samples([1 - c if f else c for c, f in zip(base, flip)], seed=seed)
    v = stats.interval(varied, "acc", seed=5)
    per_seed = [np.mean([s["metrics"]["acc"] for s in varied if s["seed"] == k]) for k in (0, 1, 2)]
    assert v["value"] == pytest.approx(np.mean(per_seed))
    assert v["ci"][0] <= v["value"] <= v["ci"][1]


def test_paired_difference():
    rng = np.random.default_rng(7)
    a = (rng.random(500) < 0.7).astype(int)
    b = a.copy()
    flip = rng.random(500) < 0.15
    b[flip & (a == 1)] = 0  # b: a with some right answers turned wrong
    sa, sb = _mc_samples(a.tolist()), _mc_samples(b.tolist())
    d = stats.paired_difference(sa, sb, "acc", n_boot=1000, seed=0)
    assert d["diff"] == pytest.approx(a.mean() - b.mean()) and d["n"] == 500
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["excludes_zero"]
    # pairing matters: the unpaired interval is much wider
    ia, ib = stats.interval(sa, "acc", seed=0), stats.interval(sb, "acc", seed=1)
    unpaired = math.hypot(ia["ci"][1] - ia["ci"][0], ib["ci"][1] - ib["ci"][0])
    assert d["ci"][1] - d["ci"][0] < 0.6 * unpaired
    # identical models: zero difference, interval [0, 0], not significant
    z = stats.paired_difference(sa, sa, "acc")
    assert z["diff"] == 0 and z["ci"] == [0.0, 0.0] and not z["excludes_zero"]
    # examples matched by id, whatever the order; only shared ids count
    rev = list(reversed(sb))[:300]
    d2 = stats.paired_difference(sa, rev, "acc")
    keep = {s["id"] for s in rev}
    assert d2["n"] == 300
    assert d2["diff"] == pytest.approx(np.mean([s["metrics"]["acc"] for s in sa if s["id"] in keep])
                                       - np.mean([s["metrics"]["acc"] for s in rev]))
    # a family mean of differences
    fam = stats.mean_of_differences([stats.paired_difference(sa, sb, "acc", keep_replicates=True)] * 2)
    assert fam["diff"] == pytest.approx(d["diff"]) and fam["tasks"] == 2


def test_task_intervals_flags_a_mismatch():
    s = _mc_samples([1, 0, 1, 1])
    out = stats.task_intervals({"acc": 0.75, "n": 4, "lr": 1e-4}, s)
    assert set(out) == {"acc"}
    out = stats.task_intervals({"acc": 0.5, "n": 4}, s)
    assert out["_mismatch"] == ["acc"]


# -- the plan -------------------------------------------------------------------------------------------
@pytest.fixture
def study_data(tmp_path, data):
    """The tiny evaluation data plus a small pretraining corpus in pretrain/ (symlinked tasks)."""
    root = tmp_path / "studydata"
    root.mkdir()
    for name in os.listdir(data):
        os.symlink(data / name, root / name)
    texts = demo_texts(40, 3000)
    (root / "pretrain").mkdir()
    (root / "pretrain" / "demo-00000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


TINY = dict(sizes=["micro"], tokens=2.4e4, tasks="arc_easy,sst2,lambada_openai,winogender",
            eval_overrides={"limit": 8, "seeds": (0, 1)}, n_boot=200, vocab_size=512, checkpoints=1)


def test_plan_units_and_fingerprints(tmp_path, study_data):
    cfg = make_config(out=tmp_path / "s", data=study_data, **TINY)
    plan = build_plan(cfg)
    kinds = [u.kind for u in plan.units]
    assert kinds.count("data") == 1 and kinds.count("train") == 3 and kinds.count("convert") == 2 and kinds.count("export") == 4
    # every checkpoint of every model on every task
    n_ck = sum(len(ln.checkpoints) for ln in plan.lines)
    assert kinds.count("eval") == n_ck * 4
    assert len({u.fingerprint for u in plan.units}) == len(plan.units)
    assert [u.fingerprint for u in build_plan(cfg).units] == [u.fingerprint for u in plan.units]

    # a stage-3 value: stage 3, conversions, exports, and evaluations of their checkpoints only
    cfg3 = make_config(out=tmp_path / "s", data=study_data, sets=("stage3.optim.lr=0.001",), **TINY)
    changed = {a.name for a, b in zip(plan.units, build_plan(cfg3).units) if a.fingerprint != b.fingerprint}
    s3_steps = {s for s, prod, _ in plan.line("micro", "encoder").checkpoints if prod.endswith("stage3")}
    expect = {"micro/pair/stage3"} | {u.name for u in plan.units if u.kind in ("convert", "export")}
    expect |= {u.name for u in plan.units if u.kind == "eval" and (u.model not in ("encoder", "decoder") or u.step in s3_steps)}
    assert changed == expect
    # an evaluation option: evaluations only
    cfge = make_config(out=tmp_path / "s", data=study_data, **{**TINY, "eval_overrides": {"limit": 4, "seeds": (0, 1)}})
    changed = {a.kind for a, b in zip(plan.units, build_plan(cfge).units) if a.fingerprint != b.fingerprint}
    assert changed == {"eval"}


def test_predicted_checkpoints_follow_the_trainer(tmp_path, study_data):
    from ettin.train.schedule import Plan

    plan = build_plan(make_config(out=tmp_path / "s", data=study_data, **{**TINY, "checkpoints": 3}))
    assert plan.provisional  # tokens_per_sample: auto waits for the data; full rows until then
    st, exact = measured_stages(plan.stages["micro"], False)
    assert not exact and st[1].train.tokens_per_sample == st[1].train.seq_len
    ck = predicted_checkpoints(st)
    p = Plan(st)
    ends = [p.stage_last_step(i) for i in range(3)]
    assert [c[0] for c in ck if c[0] in ends] == ends
    assert sum(1 for c in ck if c[1] == 0) == 3  # stage 1 cut in three


def test_gpu_preset_plan(tmp_path, study_data):
    cfg = make_config(out=tmp_path / "g", data=study_data, preset="gpu")
    assert cfg.sizes == ("17m", "32m", "68m") and cfg.eval["device"] == "cuda"
    plan = build_plan(cfg)
    for size in cfg.sizes:
        st = plan.stages[size]
        assert [s.model.size for s in st] == [size] * 3 and plan.cross[size].model.size == size
        assert sum(s.train.tokens for s in st) == pytest.approx(1e9, rel=1e-6)
        assert [s.train.seq_len for s in st] == [1024, 7999, 7999]
        for s in st + [plan.cross[size]]:
            assert s.train.global_batch * s.train.seq_len <= 262_144 + 8000 and s.train.micro_batch <= s.train.global_batch
            if s.train.batch_warmup_start:
                assert s.train.batch_warmup_start % s.train.batch_multiple == 0 or s.train.batch_multiple <= s.train.batch_warmup_start
        ck = predicted_checkpoints(measured_stages(st, False)[0])
        assert len(ck) == PRESETS["gpu"].checkpoints + 2
        assert plan.cross[size].train.tokens == pytest.approx(1e9 * 50e9 / 2e12, rel=0.01)


def test_bad_input_fails_before_work(tmp_path, study_data):
    with pytest.raises(EttinError, match="unknown size 'huge'"):
        build_plan(make_config(out=tmp_path / "s", data=study_data, **{**TINY, "sizes": ["huge"]}))
    with pytest.raises(EttinError, match="--data directory not found"):
        build_plan(make_config(out=tmp_path / "s", data=tmp_path / "nope", **TINY))
    rd = tmp_path / "rd"
    rd.mkdir()
    (rd / "stage1.yaml").write_text("name: stage1\n")
    with pytest.raises(EttinError, match="lacks stage2.yaml, stage3.yaml, cross-objective.yaml"):
        build_plan(make_config(out=tmp_path / "s", data=study_data, recipe_dir=rd, **TINY))
    assert not (tmp_path / "s").exists()
    import torch

    if not torch.cuda.is_available():  # the gpu preset evaluates on CUDA: refused up front here
        from ettin.study.run import run_study

        with pytest.raises(EttinError, match="no CUDA device"):
            run_study(make_config(out=tmp_path / "g", data=study_data, preset="gpu"), progress=False, echo=None)
        assert not (tmp_path / "g").exists()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "ettin", "study", "--sizes", "micro,nope", "--out", str(tmp_path / "c"),
                        "--data", str(study_data)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "unknown size 'nope'" in r.stderr
    assert not (tmp_path / "c").exists()


# -- end to end: kill, resume, change one value ---------------------------------------------------------
RUNNER = """
import json, sys
from ettin.study.plan import make_config
from ettin.study.run import run_study
kw = json.loads(sys.argv[1])
kw["eval_overrides"]["seeds"] = tuple(kw["eval_overrides"]["seeds"])
run_study(make_config(**kw), progress=False, echo=lambda s: print(s, flush=True))
"""


def _log(out):
    p = out / "study-log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _run(kw, env, timeout=600):
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(kw)], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_study_end_to_end_resume_and_rerun(tmp_path, study_data):
    out = tmp_path / "study"
    kw = {**TINY, "out": str(out), "data": str(study_data)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")

    # 1. killed once the first training stage is finished
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(kw)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 300:
        if any(r["unit"] == "micro/pair/stage1" for r in _log(out)) or proc.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _log(out)
    assert [r["unit"] for r in before][:2] == ["data", "micro/pair/stage1"]
    marks = {r["unit"]: (out / "units" / r["unit"] / "unit.json").stat().st_mtime_ns for r in before}

    # 2. the same command continues; nothing finished is recomputed
    _run(kw, env)
    log = _log(out)
    names = [r["unit"] for r in log]
    assert len(names) == len(set(names)), "a finished unit ran twice"
    for unit, mt in marks.items():
        assert (out / "units" / unit / "unit.json").stat().st_mtime_ns == mt
    plan = build_plan(make_config(**{**kw, "out": out}))
    assert set(names) == {u.name for u in plan.units} and all(u.done() for u in plan.units)

    # the JSON: sizes, models, results with intervals
    study = json.loads((out / "study.json").read_text())
    assert set(study) == {"sizes", "models", "results"} and study["sizes"] == ["micro"]
    assert set(study["models"]) == {f"micro/{m}" for m in ("encoder", "decoder", "encoder-from-decoder", "decoder-from-encoder")}
    for label, m in study["models"].items():
        assert set(m) == {"size", "kind", "objective", "origin", "tokens"} and m["tokens"] > 0
    assert study["models"]["micro/encoder-from-decoder"]["objective"] == "mntp"
    assert study["models"]["micro/decoder-from-encoder"]["kind"] == "decoder"
    from ettin.study.run import _supports_samples

    for label, tasks in study["results"].items():
        assert set(tasks) == {"arc_easy", "sst2", "lambada_openai", "winogender"}, label
        for task, cell in tasks.items():
            main = cell["main"]
            assert isinstance(cell[main], float) and cell["n"] > 0
            if _supports_samples():  # per-example samples: every score has its interval
                lo, hi = cell["ci"]
                assert lo <= cell[main] + 1e-9 and cell[main] <= hi + 1e-9, (label, task, cell)
                assert "check" not in cell, cell
    details = json.loads((out / "study-details.json").read_text())
    assert len(details["trajectories"]["micro/encoder"]) == len(plan.line("micro", "encoder").checkpoints)
    html = (out / "report.html").read_text()
    assert "Encoder tasks by size" in html and "Generative tasks by size" in html and html.count("data:image/png;base64,") >= 5
    assert (out / "report.md").is_file() and (out / "report.csv").read_text().startswith("model,size,kind")

    # 3. status reads the same state without running anything
    r = subprocess.run([sys.executable, "-m", "ettin", "study", "--status", str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and f"{len(plan.units)}/{len(plan.units)} units done" in r.stdout

    # 4. one stage-3 recipe value changed: only what depends on it reruns
    kw3 = {**kw, "sets": ["stage3.optim.lr=0.001"]}
    _run(kw3, env)
    new = [r["unit"] for r in _log(out)[len(log):]]
    s3 = {s for s, prod, _ in plan.line("micro", "encoder").checkpoints if prod.endswith("stage3")}
    assert "micro/pair/stage3" in new and "micro/pair/stage1" not in new and "micro/pair/stage2" not in new and "data" not in new
    for name in new:
        parts = name.split("/")
        if parts[1] == "eval":
            assert parts[2] not in ("encoder", "decoder") or int(parts[3]) in s3, name
    assert len(new) == 1 + 2 + 4 + 4 * (2 * len(s3) + 2)


def test_progress_line_and_eta(tmp_path, study_data):
    from ettin.study.run import estimate_seconds, report_progress, status

    plan = build_plan(make_config(out=tmp_path / "s", data=study_data, **TINY))
    train = [u for u in plan.units if u.kind == "train"]
    log = [{"unit": train[0].name, "kind": "train", "seconds": 10.0, "cost": train[0].cost, "task": None},
           {"unit": "x", "kind": "eval", "seconds": 2.0, "cost": 1.0, "task": "sst2"}]
    todo = train[1:] + [u for u in plan.units if u.kind == "eval" and u.task == "sst2"]
    want = sum(10.0 / train[0].cost * u.cost for u in train[1:]) + 2.0 * (len(todo) - len(train) + 1)
    assert estimate_seconds(todo, log) == pytest.approx(want)
    assert estimate_seconds(todo, []) is None
    line = report_progress(plan, plan.units[0], log, echo=None)
    assert line.startswith("[study] running data | 0/") and "ETA" in line
    with pytest.raises(EttinError, match="not a study directory"):
        status(tmp_path / "nothing")
