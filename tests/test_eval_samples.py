"""Per-example output (``samples=`` / ``ettin eval --samples``): every task's records aggregate
to the reported numbers, and multiple choice carries the per-choice scores."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.eval import EvalModel, evaluate, evaluate_all
from ettin.eval.testing import tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def dec(tok_dir):
    return EvalModel.from_model(tiny_model("decoder", tok_dir, size="tiny", seed=3).eval(), tok_dir, name="dec")


@pytest.fixture(scope="module")
def enc(tok_dir):
    return EvalModel.from_model(tiny_model("encoder", tok_dir, size="tiny", seed=4).eval(), tok_dir, name="enc")


def _by_task(samples):
    out = {}
    for r in samples:
        out.setdefault(r["task"], []).append(r)
    return out


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("side", ["dec", "enc"])
def test_samples_aggregate_to_the_reported_metrics(side, dec, enc, data):
    em = dec if side == "dec" else enc
    samples: list = []
    res = evaluate(em, "arc_easy,winogrande,lambada_openai,wikitext2,triviaqa,winogender", data, samples=samples)
    by = _by_task(samples)
    # multiple choice: one record per item, scores in choice order, argmax = prediction
    arc = by["arc_easy"]
    assert [r["id"] for r in arc] == ["q0", "q1", "q2", "q3"] and [r["label"] for r in arc] == [0, 0, 0, 0]
    assert [len(r["scores"]) for r in arc] == [2, 2, 2, 3]
    for r in arc:
        assert r["prediction"] == max(range(len(r["scores"])), key=lambda j: (r["scores"][j], -j))
        assert r["metrics"]["acc"] == float(r["prediction"] == r["label"])
    for task in ("arc_easy", "winogrande"):
        for m in ("acc", "acc_norm"):
            assert math.isclose(_mean([r["metrics"][m] for r in by[task]]), res[task][m], abs_tol=1e-12)
        assert len(by[task]) == res[task]["n"]
    # LAMBADA: mean acc, exp(mean nll)
    lam = by["lambada_openai"]
    assert [r["label"] for r in lam] == ["mat", "ball"] and [r["id"] for r in lam] == ["l0", "l1"]
    assert math.isclose(_mean([r["metrics"]["acc"] for r in lam]), res["lambada_openai"]["acc"], abs_tol=1e-12)
    ppl = [k for k in res["lambada_openai"] if k.endswith("perplexity")][0]
    assert math.isclose(math.exp(_mean([r["metrics"]["nll"] for r in lam])), res["lambada_openai"][ppl], rel_tol=1e-9)
    # text perplexity: per-document nll / tokens / bytes recompute every aggregate
    wt = by["wikitext2"]
    assert len(wt) == 2 and [r["id"] for r in wt] == [1, 3]  # line numbers (the blank line 2 is skipped)
    nll = sum(r["metrics"]["nll"] for r in wt)
    prefix = "" if side == "dec" else "pseudo_"
    assert sum(r["metrics"]["tokens"] for r in wt) == res["wikitext2"]["tokens"]
    assert math.isclose(math.exp(nll / sum(r["metrics"]["tokens"] for r in wt)), res["wikitext2"][f"{prefix}perplexity"], rel_tol=1e-9)
    assert math.isclose(nll / sum(r["metrics"]["bytes"] for r in wt) / math.log(2), res["wikitext2"][f"{prefix}bits_per_byte"],
                        rel_tol=1e-9)
    assert math.isclose(math.exp(nll / sum(r["metrics"]["words"] for r in wt)), res["wikitext2"][f"{prefix}word_perplexity"],
                        rel_tol=1e-9)
    # winogender: one record per sentence, indicator metrics average to the shares
    wg = by["winogender"]
    assert len(wg) == res["winogender"]["n"]
    for g in ("male", "female", "neutral"):
        assert math.isclose(_mean([r["metrics"][g] for r in wg]), res["winogender"][g], abs_tol=1e-12)
    if side == "dec":
        tq = by["triviaqa"]
        assert [r["id"] for r in tq] == ["t0", "t1"]
        assert math.isclose(_mean([r["metrics"]["exact_match"] for r in tq]), res["triviaqa"]["exact_match"], abs_tol=1e-12)
    else:
        assert "triviaqa" not in by  # not applicable: no examples scored


def test_samples_glue_and_retrieval(enc, data):
    samples: list = []
    res = evaluate(enc, "rte,scifact", data, samples=samples, limit=4, seeds=[0, 1], lrs=[1e-4], epochs=1)
    by = _by_task(samples)
    rte = by["rte"]
    assert len(rte) == 2 * 4 and sorted({r["seed"] for r in rte}) == [0, 1]
    for seed in (0, 1):
        assert [r["id"] for r in rte if r["seed"] == seed] == ["g0", "g1", "g2", "g3"]
    per_seed = [_mean([r["metrics"]["accuracy"] for r in rte if r["seed"] == s]) for s in (0, 1)]
    assert math.isclose(_mean(per_seed), res["rte"]["accuracy"], abs_tol=1e-12)
    sf = by["scifact"]
    assert len(sf) == res["scifact"]["n"]
    assert math.isclose(_mean([r["metrics"]["ndcg@10"] for r in sf]), res["scifact"]["ndcg@10"], abs_tol=1e-12)
    assert all(isinstance(r["label"], dict) and len(r["prediction"]) <= 10 for r in sf)


def test_evaluate_all_tags_model_and_step(tmp_path, tok_dir, data):
    run = tmp_path / "run"
    for step in (1, 5):
        tiny_checkpoint(run / "checkpoints" / str(step), "decoder", tok_dir, seed=step, step=step)
    samples: list = []
    recs = evaluate_all(run, "arc_easy", data, samples=samples)
    assert [r["step"] for r in recs] == [1, 5]
    assert [(r["step"], r["id"]) for r in samples] == [(s, q) for s in (1, 5) for q in ("q0", "q1", "q2", "q3")]
    assert list(samples[0])[:4] == ["model", "step", "kind", "task"]


def test_cli_samples_file(tmp_path, tok_dir, data):
    ck = tiny_checkpoint(tmp_path / "enc", "encoder", tok_dir, seed=1, step=3)
    out, smp = tmp_path / "r.json", tmp_path / "s.jsonl"
    res = CliRunner().invoke(app, ["eval", str(ck), "--tasks", "arc_easy,boolq", "--data", str(data), "--limit", "3",
                                   "--json", str(out), "--samples", str(smp)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    lines = [json.loads(x) for x in smp.read_text().splitlines()]
    assert [(r["task"], r["id"]) for r in lines] == [("arc_easy", "q0"), ("arc_easy", "q1"), ("arc_easy", "q2"),
                                                     ("boolq", "b0"), ("boolq", "b1")]
    assert all(r["step"] == 3 and r["kind"] == "encoder" for r in lines)
    arc = [r for r in lines if r["task"] == "arc_easy"]
    assert math.isclose(_mean([r["metrics"]["acc"] for r in arc]), doc["results"]["arc_easy"]["acc"], abs_tol=1e-12)
    assert all(len(r["scores"]) == 2 and all(isinstance(s, float) and s < 0 for s in r["scores"]) for r in arc)
    assert not list(tmp_path.glob("*.tmp*"))
