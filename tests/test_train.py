import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_recipe
from ettin.cli import app
from ettin.errors import EttinError
from ettin.train.trainer import RunDir, batch_at, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def metrics(run):
    return [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]


def weights(run):
    step, path = RunDir(Path(run)).list_checkpoints()[-1]
    return step, load_file(str(path / "model.safetensors"))


def cli(*args, check=True, timeout=300):
    r = subprocess.run([sys.executable, "-m", "ettin", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(r.stdout + r.stderr)
    return r


def test_metrics_checkpoints_and_batch_inspector(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data)
    res = train(recipe, tmp_path / "run", progress=False)
    assert res["finished"] and res["steps"] == 16
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(1, 17))
    for key in ("step", "tokens", "loss", "lr", "batch_size", "seq_len", "mask_rate", "grad_norm", "tokens_per_s", "mfu", "batch_hash"):
        assert key in m[0]
    assert m[-1]["tokens"] == 16 * 8 * 32 and m[0]["lr"] == pytest.approx(3e-3 * 256 / 512 * 0)  # warmup starts at 0
    assert [s for s, _ in RunDir(tmp_path / "run").list_checkpoints()] == [4, 8, 12, 16]
    # nothing pickled: safetensors and JSON only
    ck = RunDir(tmp_path / "run").list_checkpoints()[-1][1]
    files = {p.suffix for p in ck.rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json", ".txt"}
    # the inspector recomputes exactly the logged batch
    for step in (1, 7, 16):
        assert batch_at(tmp_path / "run", step)["batch_hash"] == m[step - 1]["batch_hash"]
    r = CliRunner().invoke(app, ["batches", str(tmp_path / "run"), "--step", "5", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    import hashlib

    import numpy as np

    ids = np.asarray(doc["input_ids"], dtype="<i8")
    assert hashlib.sha256(ids.tobytes()).hexdigest() == doc["batch_hash"] == m[4]["batch_hash"]
    assert ids.shape == (8, 32)


@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no-clip", "clip"])
def test_grad_norm_is_logged_and_gradients_are_clipped_only_when_asked(tiny_data, tmp_path, monkeypatch, clip):
    """The logged grad_norm is the norm before clipping; the optimizer sees the gradients unchanged
    without optim.grad_clip (the paper's recipe) and scaled to the bound with it."""
    from ettin.train import trainer as TR

    at_step = []  # the gradients' norm when the optimizer steps

    def norm(opt):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]))

    orig = TR.Learner.step

    def step(self, plan, ids, docs):
        if not getattr(self, "_spied", False):
            self._spied = True
            self.optim.register_step_pre_hook(lambda opt, args, kwargs: at_step.append(float(norm(opt))))
        return orig(self, plan, ids, docs)

    monkeypatch.setattr(TR.Learner, "step", step)
    over = {"train.tokens": 3 * 8 * 32, **({"optim.grad_clip": clip} if clip else {})}
    train(write_recipe(tmp_path / "r.yaml", tiny_data, **over), tmp_path / "run", progress=False)
    logged = [r["grad_norm"] for r in metrics(tmp_path / "run")]
    assert len(logged) == len(at_step) == 3
    for g, s in zip(logged, at_step):
        if clip is None:
            assert s == pytest.approx(g, rel=1e-5) and g > 1e-3
        else:
            assert g > 10 * clip and s == pytest.approx(clip, rel=1e-3)


@pytest.mark.parametrize("dropout", [None, 0.1], ids=["no-dropout", "attn-out-dropout"])
def test_kill_9_then_resume_is_bitwise_identical(tiny_data, tmp_path, dropout):
    over = {"train.tokens": 24 * 8 * 32}
    if dropout is not None:  # the dropout masks must come back exactly on resume
        over["model.attn_out_dropout"] = dropout
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **over)
    cli("train", recipe, "--out", tmp_path / "ref", "--no-progress")
    proc = subprocess.Popen([sys.executable, "-m", "ettin", "train", str(recipe), "--out", str(tmp_path / "cut"), "--no-progress"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not RunDir(tmp_path / "cut").list_checkpoints() and time.time() - t0 < 120:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunDir(tmp_path / "cut").list_checkpoints(), "killed before the first checkpoint"
    cli("train", recipe, "--out", tmp_path / "cut", "--no-progress")
    a, b = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["batch_hash"] for r in a] == [r["batch_hash"] for r in b]
    sa, wa = weights(tmp_path / "ref")
    sb, wb = weights(tmp_path / "cut")
    assert sa == sb == 24
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_max_steps_then_continue(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"model.kind": "decoder"})
    res = train(recipe, tmp_path / "run", max_steps=3, progress=False)
    assert not res["finished"] and [s for s, _ in RunDir(tmp_path / "run").list_checkpoints()] == [3]
    res = train(recipe, tmp_path / "run", progress=False)
    assert res["resumed_from"] == 3 and res["finished"]
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 17))


def test_pair_lockstep_identical_batches_and_learning(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"train.tokens": 40 * 8 * 32, "checkpoint.every_tokens": 10**9})
    train(recipe, tmp_path / "pair", pair=True, progress=False)
    enc, dec = metrics(tmp_path / "pair" / "encoder"), metrics(tmp_path / "pair" / "decoder")
    assert [r["batch_hash"] for r in enc] == [r["batch_hash"] for r in dec]
    assert {r["objective"] for r in enc} == {"mlm"} and {r["objective"] for r in dec} == {"clm"}
    for side in (enc, dec):
        first = sum(r["loss"] for r in side[:3]) / 3
        last = sum(r["loss"] for r in side[-3:]) / 3
        assert last < first - 0.5, (first, last)


def test_stages_change_length_theta_mask_and_continue(tiny_data, tmp_path):
    s1 = write_recipe(tmp_path / "s1.yaml", tiny_data, **{"train.tokens": 4 * 8 * 32})
    s2 = write_recipe(
        tmp_path / "s2.yaml",
        tiny_data,
        **{"name": "stage2", "model.init_from": "previous", "train.tokens": 2 * 4 * 64, "train.seq_len": 64, "train.global_batch": 4, "train.rope_theta": 160000, "train.mask_rate": 0.15},
    )
    (tmp_path / "all.yaml").write_text("stages: [s1.yaml, s2.yaml]\n")
    train(tmp_path / "all.yaml", tmp_path / "run", progress=False)
    m = metrics(tmp_path / "run")
    assert [(r["stage"], r["seq_len"], r["mask_rate"]) for r in m] == [("stage1", 32, 0.3)] * 4 + [("stage2", 64, 0.15)] * 2
    cfg = json.loads((RunDir(tmp_path / "run").list_checkpoints()[-1][1] / "ettin.json").read_text())
    assert cfg["model"]["rope_theta_global"] == cfg["model"]["rope_theta_local"] == 160000
    stage1_end = json.loads((RunDir(tmp_path / "run").checkpoint_at(4) / "trainer" / "state.json").read_text())
    assert stage1_end["stage_done"] and stage1_end["stage"] == "stage1"
    # a separate stage-2 file appended to an existing run continues the same way
    train(s1, tmp_path / "run2", progress=False)
    train(s2, tmp_path / "run2", progress=False)
    assert [r["loss"] for r in metrics(tmp_path / "run2")] == [r["loss"] for r in m]


def test_nan_loss_stops_with_clear_message(tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"optim.lr": 1e30, "optim.name": "adamw", "optim.schedule.warmup_tokens": 0})
    r = cli("train", recipe, "--out", tmp_path / "run", "--no-progress", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "loss is nan" in r.stderr
    for _, path in RunDir(tmp_path / "run").list_checkpoints():
        w = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in w.values())


def test_bad_input_one_line_errors(tiny_data, tmp_path):
    runner = CliRunner()
    bad = write_recipe(tmp_path / "bad.yaml", tiny_data)
    bad.write_text(bad.read_text().replace("mask_rate", "mask_ratio"))
    r = cli("train", bad, "--out", tmp_path / "x", check=False)
    assert r.returncode == 1 and "did you mean 'train.mask_rate'" in r.stderr and r.stderr.count("\n") == 1
    missing = write_recipe(tmp_path / "m.yaml", tiny_data, **{"model.init_from": str(tmp_path / "nope")})
    with pytest.raises(EttinError, match="no checkpoint found|no such"):
        train(missing, tmp_path / "y", progress=False)
    small = write_recipe(tmp_path / "v.yaml", tiny_data, **{"model.vocab_size": 64})
    with pytest.raises(EttinError, match="smaller than the data tokenizer"):
        train(small, tmp_path / "z", progress=False)
    nodata = write_recipe(tmp_path / "n.yaml", tmp_path / "no-data")
    with pytest.raises(EttinError, match="data source not found"):
        train(nodata, tmp_path / "w", progress=False)
    assert not (tmp_path / "y" / "checkpoints").exists() and not (tmp_path / "z" / "checkpoints").exists()
    del runner


def test_batch_order_export_and_decode(tiny_data, tmp_path):
    import pyarrow.parquet as pq

    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"train.tokens": 3 * 8 * 32})
    train(recipe, tmp_path / "run", progress=False)
    r = CliRunner().invoke(app, ["batches", str(tmp_path / "run"), "--export", str(tmp_path / "order.parquet")])
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "order.parquet").to_pydict()
    assert t["step"] == [1] * 8 + [2] * 8 + [3] * 8 and t["row"] == list(range(24))
    import hashlib

    import numpy as np

    m = metrics(tmp_path / "run")
    for step in (1, 2, 3):
        ids = np.asarray([row for s, row in zip(t["step"], t["input_ids"]) if s == step], dtype="<i8")
        assert hashlib.sha256(ids.tobytes()).hexdigest() == m[step - 1]["batch_hash"]
    r = CliRunner().invoke(app, ["batches", str(tmp_path / "run"), "--step", "2", "--decode"])
    assert r.exit_code == 0 and r.output.count("--- row") == 8
    r = CliRunner().invoke(app, ["batches", str(tmp_path / "run"), "--step", "99"])
    assert r.exit_code != 0
