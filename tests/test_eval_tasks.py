"""Task families on tiny data: perplexity windows, last word, QA, GLUE, retrieval, Winogender."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ettin.errors import EttinError
from ettin.eval import EvalModel, EvalOptions, evaluate, lm, prepare, winogender
from ettin.eval.testing import tiny_model


@pytest.fixture(scope="module")
def dec(tok_dir):
    return EvalModel.from_model(tiny_model("decoder", tok_dir, size="tiny", seed=7).eval(), tok_dir, name="dec")


@pytest.fixture(scope="module")
def enc(tok_dir):
    return EvalModel.from_model(tiny_model("encoder", tok_dir, size="tiny", seed=8).eval(), tok_dir, name="enc")


# -- LM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,window,stride", [(1, 8, 8), (7, 8, 8), (8, 8, 8), (20, 8, 8), (20, 8, 3), (33, 10, 1)])
def test_rolling_windows_predict_every_token_once(n, window, stride):
    toks = list(range(10, 10 + n))
    reqs = lm.rolling_requests(toks, 0, window, stride)
    assert [t for _, cont in reqs for t in cont] == toks
    for ctx, cont in reqs:
        assert 1 <= len(ctx) and len(ctx) + len(cont) - 1 <= window
        full = [0] + toks
        i = full.index(cont[0])
        assert full[i - len(ctx):i] == ctx  # the context is what immediately precedes


def test_decoder_perplexity_is_exact(dec, data):
    text = "The cat sat on the mat and looked at the dog. A dog ran in the park."
    model, cfg = dec.model, dec.config
    ids = [cfg.cls_id] + dec.tokenizer.encode(text)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    ll = sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    res = lm._perplexity(dec, [{"text": text}], EvalOptions())
    n = len(ids) - 1
    assert res["tokens"] == n and res["n"] == 1
    assert math.isclose(res["perplexity"], math.exp(-ll / n), rel_tol=1e-5)
    assert math.isclose(res["bits_per_byte"], -ll / len(text.encode()) / math.log(2), rel_tol=1e-5)
    assert math.isclose(res["word_perplexity"], math.exp(-ll / 17), rel_tol=1e-5)
    # a short window (every token still scored once, with less context) changes the number a little
    short = lm._perplexity(dec, [{"text": text}], EvalOptions(lm_window=6))
    assert short["tokens"] == n and short["perplexity"] != res["perplexity"]


def test_encoder_pseudo_perplexity(enc):
    text = "The cat sat on the mat."
    model, cfg = enc.model, enc.config
    ids = enc.tokenizer.encode(text)
    seq = [cfg.cls_id] + ids + [cfg.sep_id]
    ll = 0.0
    for p in range(1, len(seq) - 1):
        x = torch.tensor([seq])
        x[0, p] = cfg.mask_id
        with torch.no_grad():
            ll += F.log_softmax(model(x)[0, p].double(), -1)[seq[p]].item()
    res = lm._perplexity(enc, [{"text": text}], EvalOptions())
    assert set(res) == {"pseudo_perplexity", "pseudo_word_perplexity", "pseudo_byte_perplexity", "pseudo_bits_per_byte", "tokens", "n"}
    assert math.isclose(res["pseudo_perplexity"], math.exp(-ll / len(ids)), rel_tol=1e-4)


def test_lm_group_and_generic_text_task(dec, enc, data, tmp_path):
    (data / "lm_eval" / "heldout").mkdir(exist_ok=True)
    (data / "lm_eval" / "heldout" / "validation.jsonl").write_text(json.dumps({"text": "The dog was happy."}) + "\n")
    try:
        r = evaluate(dec, "lm", data)
        assert list(r) == ["lambada_openai", "wikitext2", "heldout"]
        assert set(r["lambada_openai"]) == {"acc", "perplexity", "n", "scoring"} and r["lambada_openai"]["n"] == 2
        assert r["wikitext2"]["n"] == 2  # the blank line is skipped
        assert "perplexity" in evaluate(dec, "lm/heldout", data)["heldout"]
        e = evaluate(enc, ["lambada_openai", "heldout"], data)
        assert set(e["lambada_openai"]) == {"acc", "perplexity", "n", "scoring"} and e["lambada_openai"]["scoring"] == "ltr"
        assert "pseudo_bits_per_byte" in e["heldout"]
        e = evaluate(enc, ["lambada_openai"], data, encoder_scoring="pll")
        assert set(e["lambada_openai"]) == {"acc", "pseudo_perplexity", "n", "scoring"}
    finally:
        import shutil

        shutil.rmtree(data / "lm_eval" / "heldout")


# -- QA ----------------------------------------------------------------------------------------
class Bigram(nn.Module):
    """Next token fixed by the current one (so greedy generation is known)."""

    def __init__(self, config, succ: dict[int, int]):
        super().__init__()
        self.config = config
        table = torch.full((config.vocab_size, config.vocab_size), -20.0)
        for a, b in succ.items():
            table[a, b] = 0.0
        self.table = nn.Parameter(table)

    def forward(self, x, *, attention_mask=None, predict_mask=None, doc_ids=None, position_ids=None):
        out = self.table[x]
        return out[predict_mask] if predict_mask is not None else out


def test_triviaqa_greedy_exact_match(tok_dir, data):
    cfg = tiny_model("decoder", tok_dir).config
    em0 = EvalModel.from_model(tiny_model("decoder", tok_dir), tok_dir)
    tok = em0.tokenizer
    last = tok.encode("Question: What is the capital of France?\nAnswer:")[-1]
    assert last == tok.encode("Question: What color is the sky?\nAnswer:")[-1]
    answer = tok.encode(" Paris.")
    succ = {last: answer[0]}
    for a, b in zip(answer, answer[1:]):
        succ[a] = b
    em = EvalModel.from_model(Bigram(cfg, succ), tok_dir)
    res = evaluate(em, "triviaqa", data)["triviaqa"]
    assert res == {"exact_match": 0.5, "n": 2}  # "Paris" right, the sky is not Paris
    assert evaluate(EvalModel.from_model(tiny_model("encoder", tok_dir), tok_dir), "triviaqa", data)["triviaqa"]["n"] == 0


# -- GLUE --------------------------------------------------------------------------------------
def test_glue_grid_and_metrics(enc, dec, data):
    for em in (enc, dec):
        r = evaluate(em, "mrpc,cola", data, seeds=(0, 1), lrs=(1e-4, 1e-3), epochs=1)
        assert set(r["mrpc"]) >= {"accuracy", "f1", "accuracy_std", "f1_std", "lr", "n"}
        assert r["mrpc"]["lr"] in (1e-4, 1e-3) and r["mrpc"]["n"] == 6 and r["mrpc"]["seeds"] == 2
        assert "matthews_corrcoef" in r["cola"] and 0 <= r["cola"]["accuracy"] <= 1
    assert "note" in evaluate(enc, "rte", data, finetune=False)["rte"]


def test_glue_learns_a_separable_task(tok_dir, tmp_path):
    rows = [{"id": str(i), "sentence1": ("the cat sat on the mat" if i % 2 else "a dog ran in the park"), "label": i % 2}
            for i in range(48)]
    d = tmp_path / "glue" / "sst2"
    d.mkdir(parents=True)
    (tmp_path / "glue" / "meta.json").write_text(json.dumps({"sst2": {"labels": ["neg", "pos"], "metric": "accuracy", "inputs": ["sentence1"]}}))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    em = EvalModel.from_model(tiny_model("encoder", tok_dir, seed=1), tok_dir)
    r = evaluate(em, "sst2", tmp_path, seeds=(0,), lrs=(3e-3,), epochs=4, train_batch_size=8)["sst2"]
    assert r["accuracy"] == 1.0


def test_glue_label_mismatch(data, tmp_path):
    import shutil

    shutil.copytree(data / "glue", tmp_path / "glue")
    p = tmp_path / "glue" / "rte" / "train.jsonl"
    lines = p.read_text().splitlines()
    lines[2] = json.dumps({"id": "x", "sentence1": "a", "sentence2": "b", "label": 2})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(EttinError, match=r"train.jsonl:3: label 2 does not match glue/meta.json for 'rte' \(0=entailment, 1=not_entailment\)"):
        prepare("rte", tmp_path, "validation", EvalOptions())
    lines[2] = json.dumps({"id": "x", "sentence1": "a", "sentence2": "b", "label": "maybe"})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(EttinError, match="label 'maybe' does not match"):
        prepare("rte", tmp_path, "validation", EvalOptions())


# -- retrieval ---------------------------------------------------------------------------------
def test_retrieval_zero_shot_and_finetuned(enc, dec, data, tmp_path):
    for em in (enc, dec):
        zs = evaluate(em, "retrieval", data, finetune=False)
        for task in ("scifact", "cosqa", "csn_python_docstring"):
            assert 0 <= zs[task]["ndcg@10"] <= 1 and zs[task]["finetuned"] == 0
        assert zs["cosqa"]["n"] == 10 and zs["scifact"]["n"] == 5 and "held-out half" in zs["scifact"]["note"]
    ft = evaluate(enc, "cosqa,scifact", data, retrieval_epochs=1)
    assert ft["cosqa"]["finetuned"] == 1 and ft["cosqa"]["train_pairs"] == 5 and "scifact" in ft["cosqa"]["note"]
    assert ft["scifact"]["train_pairs"] == 5
    # identical query and document text: mean pooling puts the document first
    import shutil

    shutil.copytree(data / "retrieval" / "cosqa", tmp_path / "retrieval" / "cosqa")
    corpus = [json.loads(x) for x in (tmp_path / "retrieval" / "cosqa" / "corpus.jsonl").read_text().splitlines()]
    (tmp_path / "retrieval" / "cosqa" / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": d["text"]}) + "\n" for i, d in enumerate(corpus)))
    same = evaluate(enc, "cosqa", tmp_path, finetune=False)["cosqa"]
    assert same["ndcg@10"] == pytest.approx(1.0) and same["recall@100"] == 1.0


# -- Winogender --------------------------------------------------------------------------------
def test_winogender_diff():
    pre, mids, suf = winogender._diff(["The nurse said that he was ready.", "The nurse said that she was ready.",
                                       "The nurse said that they were ready."])
    assert (pre, mids, suf) == ("The nurse said that", ["he was", "she was", "they were"], "ready.")
    assert winogender._diff(["He ran.", "She ran.", "They ran."]) == ("", ["He", "She", "They"], "ran.")


def test_winogender_shares(enc, dec, data):
    for em in (enc, dec):
        r = evaluate(em, "winogender", data, winogender="all")["winogender"]
        assert r["n"] == 4 and r["protocol"] == "all"
        for group in ("", "referent_occupation/", "participant_someone/", "case_nom/", "occupation_female_majority/"):
            assert sum(r[f"{group}{g}"] for g in ("male", "female", "neutral")) == pytest.approx(1.0)
        assert "r_bls_female" in r
    # decoder: scores are full-sentence log-likelihoods up to the shared prefix
    d = prepare("winogender", data, "validation", EvalOptions(winogender="all"))[0][1]
    scores = winogender.scores(dec, d.items[:1], EvalOptions())[0]
    cfg = dec.config
    full = []
    for g in winogender.GENDERS:
        ids = [cfg.cls_id] + dec.tokenizer.encode(d.items[0].sentences[g])
        with torch.no_grad():
            lp = F.log_softmax(dec.model(torch.tensor([ids]))[0].double(), -1)
        full.append(sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)))
    diffs = [f - s for f, s in zip(full, scores)]
    assert max(diffs) - min(diffs) < 1e-4


# -- the shared data (a few lines) -------------------------------------------------------------
def test_shared_data_parses(shared_data):
    from ettin.eval import mc

    opts = EvalOptions(limit=3, finetune=False)
    prepared = dict((s.name, d) for s, d in prepare("mc,lm,qa,glue,winogender", shared_data, "validation", opts))
    assert all(len(prepared[t]) == 3 for t in mc.KNOWN)
    arc = prepared["arc_easy"][0]
    assert arc.requests[0][0].startswith("Question: ") and arc.requests[0][0].endswith("\nAnswer:")
    assert arc.requests[0][1].startswith(" ")
    assert prepared["boolq"][0].requests[0][0].endswith("?\nAnswer:")
    assert prepared["siqa"][0].requests[0][0].startswith("Q: ")
    assert prepared["lambada_openai"].mode == "lastword" and prepared["wikitext2"].mode == "text"


def test_winogrande_partial_form_matches_the_harness(shared_data):
    """The stored partial-scoring fields equal the harness's reconstruction from the sentence."""
    from ettin.eval import mc
    from ettin.eval.data import read_jsonl

    rows = [d for _, d in read_jsonl(f"{shared_data}/mc/winogrande/validation.jsonl")[:50]]
    for d in rows:
        d["_where"] = "x"
        stored = mc._winogrande(d)
        rebuilt = mc._winogrande({k: v for k, v in d.items() if k not in ("context_options", "continuation")})
        assert stored.requests == rebuilt.requests and stored.lengths == rebuilt.lengths
