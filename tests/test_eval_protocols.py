"""Evaluation protocols as the Ettin authors ran them: retrieval pooling and hard negatives,
the Winogender gotcha probe, and --limit bounding every task."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from ettin.eval import EvalModel, EvalOptions, evaluate, prepare, retrieval
from ettin.eval.testing import tiny_model


@pytest.fixture(scope="module")
def dec(tok_dir):
    return EvalModel.from_model(tiny_model("decoder", tok_dir, size="tiny", seed=21).eval(), tok_dir, name="dec")


@pytest.fixture(scope="module")
def enc(tok_dir):
    return EvalModel.from_model(tiny_model("encoder", tok_dir, size="tiny", seed=22).eval(), tok_dir, name="enc")


# -- retrieval ---------------------------------------------------------------------------------
def _cosine(em, data, pooling: str) -> dict[str, dict[str, float]]:
    """By hand: [CLS] text [SEP], pooled, cosine of every query with every document."""
    cfg = em.config

    def emb(text, max_len):
        ids = [cfg.cls_id] + em.tokenizer.encode(text)[: max_len - 2] + [cfg.sep_id]
        with torch.no_grad():
            h = em.model.encode(torch.tensor([ids]))[0].float()
        v = h[-1] if pooling == "last" else h.mean(0)
        return F.normalize(v, dim=-1)

    docs = {d: emb(t, 256) for d, t in data.corpus.items()}
    out = {}
    for q, t in data.queries.items():
        e = emb(t, 64)
        out[q] = {d: float(e @ v) for d, v in docs.items()}
    return out


def _agrees(samples, sims) -> bool:
    """Every retrieved first document is (up to float noise) the best by the hand computation."""
    return all(sims[r["id"]][r["prediction"][0]] >= max(sims[r["id"]].values()) - 1e-5 for r in samples)


def _top(sims) -> dict[str, str]:
    return {q: max(s, key=s.get) for q, s in sims.items()}


def test_decoders_pool_the_last_token_by_default(dec, enc, data):
    samples: list = []
    res = evaluate(dec, "cosqa", data, finetune=False, samples=samples)["cosqa"]
    assert res["pooling"] == "last"
    [(_, rd)] = prepare("cosqa", data, "validation", EvalOptions(finetune=False))
    last, mean = _cosine(dec, rd, "last"), _cosine(dec, rd, "mean")
    assert len(samples) == len(last) and _agrees(samples, last)
    assert _top(last) != _top(mean)  # the pooling really changes what is retrieved on this model
    assert not _agrees(samples, mean)
    samples.clear()
    over = evaluate(dec, "cosqa", data, finetune=False, pooling="mean", samples=samples)["cosqa"]
    assert over["pooling"] == "mean" and _agrees(samples, mean)
    assert evaluate(enc, "cosqa", data, finetune=False)["cosqa"]["pooling"] == "mean"


def test_hard_negatives_from_judged_qrels_and_file(tmp_path, data, enc):
    task = tmp_path / "retrieval" / "scifact"
    shutil.copytree(data / "retrieval" / "scifact", task)
    rows = (task / "qrels" / "train.tsv").read_text().splitlines()
    rows += ["q0\td5\t0", "q1\td6\t0"]  # judged non-relevant: hard negatives
    (task / "qrels" / "train.tsv").write_text("\n".join(rows) + "\n")
    (task / "hard_negatives.jsonl").write_text(json.dumps({"_id": "q2", "negatives": ["d7", "d2", "nope"]}) + "\n")
    pairs = retrieval._pairs(task, {"q0", "q1", "q2", "q3"})
    corpus = retrieval.read_corpus(task / "corpus.jsonl")
    by_pos = {p[1]: p[2] for p in pairs}
    assert by_pos[corpus["d0"]] == corpus["d5"] and by_pos[corpus["d1"]] == corpus["d6"]
    assert by_pos[corpus["d2"]] == corpus["d7"]  # the file's first (d2 is the query's own positive, so skipped anyway)
    assert by_pos[corpus["d3"]] is None
    res = evaluate(enc, "scifact", tmp_path, retrieval_epochs=1)["scifact"]
    assert res["finetuned"] == 1 and res["hard_negatives"] >= 1
    (task / "hard_negatives.jsonl").write_text('{"_id": "q2"}\n')
    from ettin.errors import EttinError

    with pytest.raises(EttinError, match=r"hard_negatives.jsonl:1: .*negatives"):
        evaluate(enc, "scifact", tmp_path, retrieval_epochs=1)


def test_pooling_option_is_checked(enc, data):
    from ettin.errors import EttinError

    with pytest.raises(EttinError, match="--pooling"):
        evaluate(enc, "cosqa", data, pooling="max")
