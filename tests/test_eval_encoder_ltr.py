"""Encoders on generative tasks, scored as the Ettin authors score them: left to right, token k
read at the first of three [MASK]s followed by [SEP]; checked against sequences built by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ettin.cli import app
from ettin.eval import EvalModel, EvalOptions, evaluate, load_for_eval, mc, prepare, scoring
from ettin.eval.testing import tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def enc(tok_dir):
    return EvalModel.from_model(tiny_model("encoder", tok_dir, size="tiny", seed=11).eval(), tok_dir, name="enc")


@pytest.fixture(scope="module")
def mntp(tok_dir):
    return EvalModel.from_model(tiny_model("encoder", tok_dir, size="tiny", seed=12, objective="mntp").eval(), tok_dir, name="mntp")


PAIRS = [("Question: What color is the sky?\nAnswer:", " blue"), ("The cat sat on the", " mat and looked at the dog"),
         ("A dog ran in the park with a", " red ball."), ("Water boils at", " one hundred degrees")]


def _naive(em, pairs, shift: int) -> list[float]:
    """By hand: for token k, [CLS] ctx cont[:k] [MASK] [MASK] [MASK] [SEP], one forward each."""
    cfg = em.config
    out = []
    for ctx, cont in scoring.split_pairs(em.tokenizer, pairs):
        total = 0.0
        for k, t in enumerate(cont):
            seq = [cfg.cls_id] + ctx + cont[:k] + [cfg.mask_id] * 3 + [cfg.sep_id]
            p = 1 + len(ctx) + k
            assert seq[p] == cfg.mask_id and seq[p - 1] != cfg.mask_id
            with torch.no_grad():
                lp = F.log_softmax(em.model(torch.tensor([seq]))[0].double(), -1)
            total += lp[p - shift, t].item()
        out.append(total)
    return out


@pytest.mark.parametrize("which", ["enc", "mntp"])
def test_ltr_scoring_equals_hand_built_sequences(which, enc, mntp):
    em = enc if which == "enc" else mntp
    cfg = em.config
    shift = 1 if which == "mntp" else 0
    reqs = [([cfg.cls_id] + c, s, [cfg.sep_id]) for c, s in scoring.split_pairs(em.tokenizer, PAIRS)]
    got = scoring.masked_ltr_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=5,
                                           max_length=512, mntp=cfg.objective == "mntp")
    ref = _naive(em, PAIRS, shift)
    assert [len(s) for _, s, _ in reqs] != [1] * len(reqs)  # multi-token continuations are exercised
    for (a, _), b in zip(got, ref):
        assert abs(a - b) < 2e-5, (a, b)
    # reading the wrong position gives a different number: the shift matters
    other = _naive(em, PAIRS, 1 - shift)
    assert max(abs(a - b) for (a, _), b in zip(got, other)) > 1e-2
    # and it is not the pseudo-log-likelihood
    pll = scoring.masked_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=5, max_length=512,
                                       mntp=cfg.objective == "mntp")
    assert max(abs(a[0] - b[0]) for a, b in zip(got, pll)) > 2e-4


def test_ltr_context_cut_from_the_left(enc):
    cfg = enc.config
    ctx, cont = list(range(10, 40)), [50, 51, 52]
    rows = scoring.ltr_rows([([cfg.cls_id] + ctx, cont, [cfg.sep_id])], shift=0, max_length=12)
    assert len(rows) == 3
    for k, r in enumerate(rows):
        assert len(r.ids) == 12 and r.ids[0] == cfg.cls_id and r.ids[-1] == cfg.sep_id
        p = r.pred[0]
        assert r.mask == (p, p + 1, p + 2) and r.tgt == (cont[k],)
        assert r.ids[:p][-k:] == cont[:k] if k else r.ids[p - 1] == ctx[-1]


def test_mc_default_is_ltr_and_pll_stays_an_option(enc, data):
    samples: list = []
    res = evaluate(enc, "arc_easy,lambada_openai", data, samples=samples)
    assert res["arc_easy"]["scoring"] == "ltr" and res["lambada_openai"]["scoring"] == "ltr"
    assert "perplexity" in res["lambada_openai"]
    [(spec, items)] = prepare("arc_easy", data, "validation", EvalOptions())
    pairs = [r for it in items for r in it.requests]
    ref = _naive(enc, pairs, 0)
    flat = [s for r in samples if r["task"] == "arc_easy" for s in r["scores"]]
    assert len(flat) == len(ref) and max(abs(a - b) for a, b in zip(flat, ref)) < 1e-4
    old = evaluate(enc, "arc_easy,lambada_openai", data, encoder_scoring="pll")
    assert old["arc_easy"]["scoring"] == "pll" and "pseudo_perplexity" in old["lambada_openai"]
    cfg = enc.config
    reqs = [([cfg.cls_id] + c, s, [cfg.sep_id]) for c, s in scoring.split_pairs(enc.tokenizer, pairs)]
    pll = scoring.masked_loglikelihood(enc.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=8, max_length=512)
    lls, k = [], 0
    for it in items:
        lls.append([pll[k + j][0] for j in range(len(it.requests))])
        k += len(it.requests)
    assert old["arc_easy"]["acc"] == mc.score(items, lls)["acc"]


def test_bad_scoring_name(data, enc):
    from ettin.errors import EttinError

    with pytest.raises(EttinError, match="--encoder-scoring"):
        evaluate(enc, "arc_easy", data, encoder_scoring="mask")


def test_cli_done_when(tmp_path, tok_dir, data):
    """``ettin eval ENCODER --tasks arc_easy --limit N --json OUT --samples S.jsonl``."""
    ck = tiny_checkpoint(tmp_path / "enc", "encoder", tok_dir, seed=2)
    out, smp = tmp_path / "r.json", tmp_path / "s.jsonl"
    res = CliRunner().invoke(app, ["eval", str(ck), "--tasks", "arc_easy", "--data", str(data), "--limit", "3",
                                   "--json", str(out), "--samples", str(smp)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["results"]["arc_easy"]
    assert r["scoring"] == "ltr" and r["n"] == 3 and 0 <= r["acc"] <= 1
    lines = [json.loads(x) for x in smp.read_text().splitlines()]
    assert len(lines) == 3 and all(len(x["scores"]) == 2 for x in lines)
    assert math.isclose(sum(x["metrics"]["acc"] for x in lines) / 3, r["acc"], abs_tol=1e-12)
    [em] = load_for_eval(ck)
    [(spec, items)] = prepare("arc_easy", data, "validation", EvalOptions(limit=3))
    ref = _naive(em, [q for it in items for q in it.requests], 0)
    assert max(abs(a - b) for a, b in zip([s for x in lines for s in x["scores"]], ref)) < 1e-4
