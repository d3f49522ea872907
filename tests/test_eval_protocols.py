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


# -- winogender --------------------------------------------------------------------------------
def test_gotcha_subset_from_the_bls_statistics(shared_data):
    from ettin.eval import winogender

    d = prepare("winogender", shared_data, "validation", EvalOptions())[0][1]
    stats = d.stats
    assert d.protocol == "gotcha" and len(d.items) == 120  # 60 occupations x (participant, someone), pronoun -> occupation
    assert all(it.answer == "0" for it in d.items)
    for it in d.items:
        assert it.gotcha == ("female" if stats[it.occupation]["bls"] < 50 else "male")
    assert {it.gotcha for it in d.items} == {"male", "female"}
    assert [winogender.gotcha_gender(x) for x in (49.9, 50.0, 50.1)] == ["female", None, "male"]
    every = prepare("winogender", shared_data, "validation", EvalOptions(winogender="all"))[0][1]
    assert len(every.items) == 240 and every.protocol == "all"


class FixedLogits(torch.nn.Module):
    """The same logits at every position (scores known by construction)."""

    def __init__(self, config, logits):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(logits.clone())

    def forward(self, x, *, attention_mask=None, predict_mask=None, doc_ids=None, position_ids=None):
        out = self.w.expand(x.shape[0], x.shape[1], -1)
        return out[predict_mask] if predict_mask is not None else out


def test_gotcha_encoder_mass_known_by_construction(tok_dir, data):
    cfg = tiny_model("encoder", tok_dir).config
    em0 = EvalModel.from_model(tiny_model("encoder", tok_dir), tok_dir)
    he = em0.tokenizer.encode("told someone that he")[len(em0.tokenizer.encode("told someone that")):]
    w = torch.full((cfg.vocab_size,), -30.0)
    w[he] = 0.0  # every masked position predicts the tokens of " he"
    em = EvalModel.from_model(FixedLogits(cfg, w), tok_dir)
    samples: list = []
    r = evaluate(em, "winogender", data, samples=samples)["winogender"]
    # the fixture: only the nurse template refers to the occupation; nurses are 90% female -> gotcha = male
    assert r["n"] == 2 and r["protocol"] == "gotcha"
    assert (r["male"], r["female"], r["neutral"], r["gotcha_preferred"]) == (1.0, 0.0, 0.0, 1.0)
    assert r["mass_male"] > 0.99
    assert [s["label"] for s in samples] == ["male", "male"] and all(s["prediction"] == "male" for s in samples)


def test_gotcha_encoder_mass_by_hand(enc, data):
    """One item by hand: [CLS] prefix [MASK]... suffix [SEP], P of each form (+ capitalised)."""
    cfg = enc.config
    tok = enc.tokenizer
    samples: list = []
    r = evaluate(enc, "winogender", data, samples=samples)["winogender"]
    assert abs(r["male"] + r["female"] + r["neutral"] - 1) < 1e-12
    d = prepare("winogender", data, "validation", EvalOptions())[0][1]
    it = d.items[0]
    sent = it.sentences["male"]
    pre, post = sent.split(" he ", 1)
    post = " " + post
    mass = []
    for forms in (("he", "He"), ("she", "She"), ("they", "They")):
        total = 0.0
        for f in forms:
            ctx = tok.encode(pre)
            ftoks = tok.encode(pre + " " + f)[len(ctx):]
            right = tok.encode(pre + " he" + post)[len(tok.encode(pre + " he")):]
            ids = [cfg.cls_id] + ctx + [cfg.mask_id] * len(ftoks) + right + [cfg.sep_id]
            with torch.no_grad():
                lp = F.log_softmax(enc.model(torch.tensor([ids]))[0].double(), -1)
            p0 = 1 + len(ctx)
            total += float(torch.exp(sum(lp[p0 + i, t] for i, t in enumerate(ftoks))))
        mass.append(total)
    got = samples[0]["metrics"]
    for j, g in enumerate(("male", "female", "neutral")):
        assert abs(got[f"mass_{g}"] - mass[j] / sum(mass)) < 1e-5


def test_gotcha_decoder_lowest_per_token_perplexity(dec, data):
    cfg = dec.config
    samples: list = []
    evaluate(dec, "winogender", data, samples=samples)
    d = prepare("winogender", data, "validation", EvalOptions())[0][1]
    for s, it in zip(samples, d.items):
        per_tok = []
        for g in ("male", "female", "neutral"):
            ids = [cfg.cls_id] + dec.tokenizer.encode(it.sentences[g])
            with torch.no_grad():
                lp = F.log_softmax(dec.model(torch.tensor([ids]))[0].double(), -1)
            per_tok.append(sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1))
        assert max(abs(a - b) for a, b in zip(s["scores"], per_tok)) < 1e-5
        assert s["prediction"] == ("male", "female", "neutral")[max(range(3), key=lambda j: per_tok[j])]


# -- cost: --limit bounds perplexity tasks, masked copies are batched -------------------------------
def test_limit_bounds_perplexity_tokens(enc, dec, tmp_path):
    from ettin.eval import lm

    long_text = " ".join(["The cat sat on the mat and looked at the dog."] * 30)
    task = tmp_path / "lm_eval" / "longdoc"
    task.mkdir(parents=True)
    (task / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (long_text, long_text, "A dog ran.")))
    n_tok = len(enc.tokenizer.encode(long_text))
    assert n_tok > 100
    for em in (dec, enc):
        full = evaluate(em, "longdoc", tmp_path)["longdoc"]
        assert full["tokens"] == 2 * n_tok + len(em.tokenizer.encode("A dog ran.")) and "note" not in full
        cut = evaluate(em, "longdoc", tmp_path, limit=2, max_length=40)["longdoc"]
        assert cut["n"] == 2 and cut["tokens"] == 80
        assert "first 2 documents" in cut["note"] and "40 tokens" in cut["note"]
    # the cut document is scored exactly as if it were the whole text
    ids = enc.tokenizer.encode(long_text)[:40]
    ref = lm._perplexity(enc, [{"text": enc.tokenizer.decode(ids), "_id": 1}], EvalOptions(max_length=40))
    got = lm._perplexity(enc, [{"text": long_text, "_id": 1}], EvalOptions(limit=1, max_length=40))
    assert enc.tokenizer.encode(enc.tokenizer.decode(ids)) == ids
    assert abs(ref["pseudo_perplexity"] - got["pseudo_perplexity"]) < 1e-9 * ref["pseudo_perplexity"]


def test_batched_pseudo_perplexity_equals_one_copy_per_forward(enc):
    from ettin.eval import lm

    text = [{"text": " ".join(["The cat sat on the mat and looked at the dog."] * 6), "_id": 1},
            {"text": "A dog ran in the park with a red ball.", "_id": 2}]
    one = lm._perplexity(enc, text, EvalOptions(batch_size=1, pll_window=24))
    many = lm._perplexity(enc, text, EvalOptions(batch_size=64, pll_window=24))
    assert one["tokens"] == many["tokens"] > 60
    for k in ("pseudo_perplexity", "pseudo_bits_per_byte"):
        assert abs(one[k] - many[k]) <= 1e-5 * abs(one[k])


@pytest.mark.parametrize("kind,size", [("encoder", "tiny"), ("decoder", "tiny"), ("encoder", "micro")])
def test_read_forward_equals_the_full_forward(tok_dir, kind, size):
    from ettin.eval import scoring

    model = tiny_model(kind, tok_dir, size=size, seed=5).eval()
    cfg = model.config
    assert not model.blocks[-1].is_global or size == "micro" or cfg.layers % 3 == 1
    g = torch.Generator().manual_seed(0)
    lens = [150, 97, 150, 12]  # > the local window: the last block's window matters; padded rows
    x = torch.full((4, 150), cfg.pad_id)
    pm = torch.zeros(4, 150, dtype=torch.bool)
    for b, n in enumerate(lens):
        x[b, :n] = torch.randint(4, cfg.vocab_size, (n,), generator=g)
        pm[b, torch.randint(0, n, (3,), generator=g)] = True
    am = torch.arange(150)[None] < torch.tensor(lens)[:, None]
    with torch.inference_mode():
        ref = model(x, attention_mask=am, predict_mask=pm)
        got = scoring.read_forward(model, x, am, pm)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-4
    assert (F.log_softmax(got.double(), -1) - F.log_softmax(ref.double(), -1)).abs().max().item() < 1e-5
