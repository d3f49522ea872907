"""Scoring primitives: decoder log-likelihood against transformers, masked scoring, MNTP shift,
acc/acc_norm on a set whose answers are known by construction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ettin.eval import EvalModel, EvalOptions, load_for_eval, mc, scoring
from ettin.eval.testing import tiny_checkpoint, tiny_model


@pytest.fixture(scope="module")
def tok(tok_dir):
    return EvalModel.from_model(tiny_model("decoder", tok_dir), tok_dir).tokenizer


LONG = " ".join(["The cat sat on the mat and looked at the dog."] * 14)  # > 128 tokens: crosses local windows

DOCS = {
    "arc_easy": [
        {"context": "What color is the sky?", "choices": ["blue", "the cat sat", "a red ball"], "label": 0, "_where": "x:1"},
        {"context": LONG + " What did the cat do?", "choices": ["sat on the mat", "ran"], "label": 0, "_where": "x:2"},
    ],
    "hellaswag": [{"context": "A dog ran in the park. [title] it", "choices": ["chased a ball.", "was blue [step]"], "label": 0,
                   "_where": "x:3"}],
    "boolq": [{"context": "", "passage": "The sky is blue.", "question": "is the sky blue", "choices": ["no", "yes"], "label": 1,
               "_where": "x:4"}],
    "winogrande": [{"context": "", "choices": ["the cat", "the mat"], "label": 0, "_where": "x:5",
                    "context_options": ["The cat sat on the mat because the cat", "The cat sat on the mat because the mat"],
                    "continuation": "was tired."}],
    "openbookqa": [{"context": "Water boils at  ", "choices": ["one hundred degrees", "cold"], "label": 0, "_where": "x:6"}],
}


def _harness_split(hf_tok, context: str, continuation: str, bos: int):
    """lm-evaluation-harness ``_encode_pair`` on the transformers tokenizer, with our BOS in front."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = hf_tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = hf_tok(context, add_special_tokens=False)["input_ids"] if context else []
    return [bos] + ctx, whole[len(ctx):]


def test_decoder_mc_matches_transformers(tmp_path, tok_dir):
    """Our multiple-choice log-likelihoods equal an independent computation through the exported
    ModernBertDecoderForCausalLM (float64 on both sides, so 1e-6 is meaningful)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ettin.convert.hf import export_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "dec", "decoder", tok_dir, size="tiny", seed=3)
    hf_dir = export_checkpoint(ckpt, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).double().eval()
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    [em] = load_for_eval(ckpt)
    em.model.double()
    opts = EvalOptions(batch_size=3)
    checked = 0
    for task, docs in DOCS.items():
        items = mc.build_items(task, docs)
        ours = mc.choice_loglikelihoods(em, items, opts)
        for it, lls in zip(items, ours):
            for (context, continuation), ll in zip(it.requests, lls):
                ctx, cont = _harness_split(hf_tok, context, continuation, em.config.cls_id)
                assert (ctx[1:], cont) == scoring.split_pair(em.tokenizer, context, continuation)  # same tokens both ways
                ids = torch.tensor([ctx + cont])
                with torch.no_grad():
                    logits = hf(input_ids=ids[:, :-1]).logits[0]
                lp = F.log_softmax(logits, -1)
                ref = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
                assert abs(ll - ref) < 1e-6, (task, context[:40], continuation, ll, ref)
                checked += 1
    assert checked >= 12
    assert len(_harness_split(hf_tok, LONG, " x", 0)[0]) > 130


def test_encoder_pll_matches_transformers(tmp_path, tok_dir):
    """Masked scoring equals ModernBertForMaskedLM scoring each masked variant on its own."""
    from transformers import AutoModelForMaskedLM

    from ettin.convert.hf import export_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "enc", "encoder", tok_dir, size="tiny", seed=4)
    hf = AutoModelForMaskedLM.from_pretrained(str(export_checkpoint(ckpt, tmp_path / "hf"))).double().eval()
    [em] = load_for_eval(ckpt)
    em.model.double()
    items = mc.build_items("arc_easy", DOCS["arc_easy"][:1])
    ours = mc.choice_loglikelihoods(em, items, EvalOptions(batch_size=4, encoder_scoring="pll"))[0]
    cfg = em.config
    for (context, continuation), ll in zip(items[0].requests, ours):
        ctx, cont = scoring.split_pair(em.tokenizer, context, continuation)
        ids = [cfg.cls_id] + ctx + cont + [cfg.sep_id]
        ref = 0.0
        for j, t in enumerate(cont):
            p = 1 + len(ctx) + j
            x = torch.tensor([ids])
            x[0, p] = cfg.mask_id
            with torch.no_grad():
                ref += F.log_softmax(hf(input_ids=x).logits[0, p], -1)[t].item()
        assert abs(ll - ref) < 1e-6


def _manual_pll(model, ids: list[int], positions: list[int], mask_id: int, shift: int) -> float:
    total = 0.0
    for p in positions:
        x = torch.tensor([ids])
        x[0, p] = mask_id
        with torch.no_grad():
            total += F.log_softmax(model(x)[0, p - shift].double(), -1)[ids[p]].item()
    return total


def _requests(tok, cfg):
    texts = [("What color is the sky?", " blue"), ("The cat sat on the", " mat and looked at the dog"), ("Is fire cold?", " no")]
    out = []
    for c, s in texts:
        ctx, cont = scoring.split_pair(tok, c, s)
        out.append(([cfg.cls_id] + ctx, cont, [cfg.sep_id]))
    return out


def test_batched_masked_scoring_equals_one_variant_at_a_time(tok_dir, tok):
    model = tiny_model("encoder", tok_dir, size="tiny", seed=1).eval()
    cfg = model.config
    reqs = _requests(tok, cfg)
    kw = dict(pad_id=cfg.pad_id, mask_id=cfg.mask_id, max_length=512)
    batched = scoring.masked_loglikelihood(model, reqs, batch_size=64, **kw)
    single = scoring.masked_loglikelihood(model, reqs, batch_size=64, batched=False, **kw)
    for (a, _), (b, _), (left, span, right) in zip(batched, single, reqs):
        ref = _manual_pll(model, left + span + right, list(range(len(left), len(left) + len(span))), cfg.mask_id, 0)
        assert abs(a - b) < 1e-4 and abs(a - ref) < 1e-4
    assert sum(len(s) for _, s, _ in reqs) == len(scoring.masked_rows(reqs, shift=0, max_length=512))


def test_mntp_reads_the_previous_position(tok_dir, tok):
    model = tiny_model("encoder", tok_dir, size="tiny", objective="mntp", seed=2).eval()
    cfg = model.config
    assert cfg.objective == "mntp"
    reqs = _requests(tok, cfg)
    kw = dict(pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=16, max_length=512)
    got = scoring.masked_loglikelihood(model, reqs, mntp=True, **kw)
    for (ll, _), (left, span, right) in zip(got, reqs):
        pos = list(range(len(left), len(left) + len(span)))
        shifted = _manual_pll(model, left + span + right, pos, cfg.mask_id, 1)
        unshifted = _manual_pll(model, left + span + right, pos, cfg.mask_id, 0)
        assert abs(ll - shifted) < 1e-4
        assert abs(ll - unshifted) > 1e-3
    # the task path picks the shift up from the config
    em = EvalModel.from_model(model, tok.raw)
    items = mc.build_items("openbookqa", [{"context": "What color is the sky?", "choices": ["blue", "red"], "label": 0}])
    lls = mc.choice_loglikelihoods(em, items, EvalOptions(encoder_scoring="pll"))[0]
    ctx, cont = scoring.split_pair(tok, "What color is the sky?", " blue")
    ids = [cfg.cls_id] + ctx + cont + [cfg.sep_id]
    assert abs(lls[0] - _manual_pll(model, ids, list(range(1 + len(ctx), 1 + len(ctx) + len(cont))), cfg.mask_id, 1)) < 1e-4


class Unigram(nn.Module):
    """A context-free 'model': the same logits everywhere (so scores are known by construction)."""

    def __init__(self, config, logits: torch.Tensor):
        super().__init__()
        self.config = config
        self.w = nn.Parameter(logits.clone())

    def forward(self, x, *, attention_mask=None, predict_mask=None, doc_ids=None, position_ids=None):
        out = self.w.expand(x.shape[0], x.shape[1], -1)
        return out[predict_mask] if predict_mask is not None else out


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_acc_and_acc_norm_known_by_construction(tok_dir, tok, kind):
    cfg = tiny_model(kind, tok_dir).config
    good_short, good_long, bad = " the cat", " the cat" * 15, " #"
    good = set(tok.encode(good_short + good_long))
    assert not good & set(tok.encode(bad))
    w = torch.full((cfg.vocab_size,), -20.0)
    w[list(good)] = 0.0
    em = EvalModel.from_model(Unigram(cfg, w), tok.raw)
    docs = [
        # good tokens beat a bad one: right under acc and acc_norm
        {"context": "Q", "choices": [good_short.strip(), bad.strip()], "label": 0},
        # many good tokens (about -1.1 each) lose to two bad ones (about -21 each) on the sum, win per character
        {"context": "Q", "choices": [bad.strip(), good_long.strip()], "label": 1},
    ]
    items = mc.build_items("openbookqa", docs)
    lls = mc.choice_loglikelihoods(em, items, EvalOptions())
    lp_good = -math.log(len(good) + (cfg.vocab_size - len(good)) * math.exp(-20.0))
    n_long = len(scoring.split_pair(tok, "Q", good_long)[1])
    assert abs(lls[1][1] - n_long * lp_good) < 1e-3
    assert lls[1][0] > lls[1][1]  # acc picks the wrong (bad) choice for item 2
    res = mc.score(items, lls)
    assert res == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_split_pair_moves_trailing_space(tok):
    ctx, cont = scoring.split_pair(tok, "Water boils at ", "one")
    assert ctx == tok.encode("Water boils at")
    assert ctx + cont == tok.encode("Water boils at one")
    assert scoring.split_pairs(tok, [("Water boils at ", "one"), ("", " x")]) == [(ctx, cont), ([], tok.encode(" x"))]


def test_loglikelihood_truncates_from_the_left(tok_dir):
    model = tiny_model("decoder", tok_dir, seed=5).eval()
    cfg = model.config
    ctx, cont = list(range(5, 45)), [7, 8, 9]
    full = scoring.loglikelihood(model, [(ctx[-10:], cont)], pad_id=cfg.pad_id, batch_size=4, max_length=12)
    cut = scoring.loglikelihood(model, [(ctx, cont)], pad_id=cfg.pad_id, batch_size=4, max_length=12)
    assert abs(full[0][0] - cut[0][0]) < 1e-5


def test_shared_context_packing_equals_separate_sequences(tok_dir):
    """Choices scored together after one copy of their context give the per-sequence numbers,
    also when the context is longer than the local attention window."""
    model = tiny_model("decoder", tok_dir, size="tiny", seed=6).eval()
    cfg = model.config
    assert scoring._can_pack(model)
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(5, cfg.vocab_size, (n,), generator=g).tolist()

    groups = [([cfg.cls_id] + rand(n), [rand(m) for m in ms]) for n, ms in
              [(3, [1, 4, 2]), (150, [5, 1]), (70, [9, 9, 3, 1]), (1, [2]), (40, [30, 2])]]
    flat = [(ctx, c) for ctx, conts in groups for c in conts]
    ref = scoring.loglikelihood(model, flat, pad_id=cfg.pad_id, batch_size=3, max_length=512)
    got = [r for grp in scoring.loglikelihood_shared(model, groups, pad_id=cfg.pad_id, batch_size=5, max_length=512) for r in grp]
    assert len(got) == len(ref)
    for (a, ga), (b, gb) in zip(got, ref):
        assert abs(a - b) < 1e-4 and ga == gb
    # too long to pack: falls back to the plain (left-truncating) path with the same result
    cut = scoring.loglikelihood_shared(model, groups[1:2], pad_id=cfg.pad_id, batch_size=4, max_length=100)[0]
    plain = scoring.loglikelihood(model, [(groups[1][0], c) for c in groups[1][1]], pad_id=cfg.pad_id, batch_size=4, max_length=100)
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(cut, plain))
