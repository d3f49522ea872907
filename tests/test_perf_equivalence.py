"""Every speed-up computes what the plain computation does (values and gradients).

- fused, chunked output projection + cross-entropy == F.cross_entropy(F.linear(...)) on full logits
- the model's training path (``labels=``) == logits + F.cross_entropy, every parameter's gradient
- oneDNN linear layers == F.linear; RoPE / GeGLU autograd functions == the plain ops
- banded local attention == SDPA with the full L x L mask (window, causality, documents, pads)
- span attention (global layers with documents) == the same full-mask SDPA
- the last block at the labelled rows only (MLM) == the whole last block, then the rows
- the trainer's optimizer (optimi StableAdamW, foreach path on a CPU) == optimi's reference loop
  and the formula, over several steps, and its state round-trips through state_dict
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from ettin import objectives as O
from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer
from ettin.model import attention as A
from ettin.model import cpu as C
from ettin.model import kernels as K
from ettin.model import transformer as T

TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    """Max abs difference within ``tol`` relative to the magnitude of ``b`` (at least 1)."""
    if b.numel() == 0:
        return a.shape == b.shape
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# -- fused linear + cross-entropy -------------------------------------------------------------------
@pytest.mark.parametrize("N,V,H,chunk", [(300, 1000, 32, 64), (257, 4099, 48, None), (40, 64, 16, 7), (0, 64, 16, None)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("path", ["onednn", "aten"])
def test_linear_cross_entropy_equals_full_logits(N, V, H, chunk, bias, reduction, path, monkeypatch):
    if path == "aten":  # the plain path writes each chunk into one reused buffer
        monkeypatch.setattr(C, "use_onednn", lambda x, w: False)
    g = torch.Generator().manual_seed(N + V)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = O.IGNORE  # ignored rows: no loss, no gradient
    inputs = [t for t in (h, w, b) if t is not None]
    ref = F.cross_entropy(F.linear(h, w, b), y, reduction=reduction)
    got = O.linear_cross_entropy(h, w, b, y, reduction=reduction, chunk_rows=chunk)
    if N == 0 and reduction == "mean":  # the mean over no tokens is NaN either way
        assert torch.isnan(ref) and torch.isnan(got)
        return
    assert close(got, ref)
    scale = 0.37  # the backward scales the stored gradients by the incoming one
    g_ref = torch.autograd.grad(ref * scale, inputs, allow_unused=True)
    g_got = torch.autograd.grad(got * scale, inputs, allow_unused=True)
    for a, c in zip(g_got, g_ref):
        c = torch.zeros_like(a) if c is None else c
        assert close(a, c)


@pytest.mark.parametrize("one_exp", [True, False], ids=["softmax-cpu", "log-softmax-gpu"])
def test_linear_cross_entropy_exact_for_improbable_targets(one_exp, monkeypatch):
    """Targets with probability 0 in fp32 (loss ~200) or ~1e-26 (loss ~60): the softmax path gets
    the first from logsumexp - logit, the second from -log p; both equal the full cross-entropy."""
    orig = O._probs_and_nll
    monkeypatch.setattr(O, "_probs_and_nll", lambda *a, **k: orig(*a, **{**k, "one_exp": one_exp}))
    g = torch.Generator().manual_seed(0)
    N, V, H = 40, 300, 16
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g)
    b[7], b[8] = -200.0, -60.0
    b.requires_grad_()
    y = torch.randint(9, V, (N,), generator=g)
    y[[1, 5, 9]] = 7
    y[[2, 6]] = 8
    y[3] = O.IGNORE
    ref = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    got = O.linear_cross_entropy(h, w, b, y, chunk_rows=16)
    assert torch.isfinite(got) and ref.item() > 3 * 200
    assert close(got, ref)
    for a, c in zip(torch.autograd.grad(got, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        assert close(a, c)
    # row by row: each loss to 1e-4 (fp32 log-softmax itself is good to ~4e-6 at 60)
    z = torch.randn(6, V, generator=g) * 3
    z[:, 7] -= 200.0
    z[:, 8] -= 60.0
    t = torch.tensor([7, 8, 0, 5, 7, 8])
    p, nll = orig(z.clone(), t[:, None], torch.ones(6, dtype=torch.bool), lambda rows: z[rows], one_exp=one_exp)
    assert (nll - F.cross_entropy(z, t, reduction="none")).abs().max().item() <= 1e-4
    assert close(p, torch.softmax(z, -1))


def test_kept_buffers_made_in_inference_mode_serve_training_later(monkeypatch):
    """The fused loss's logits buffer and the paired RoPE's row order are kept between calls;
    made first under inference_mode (evaluation), they must not be inference tensors."""
    monkeypatch.setattr(C, "use_onednn", lambda x, w: False)  # the path that keeps its buffer
    monkeypatch.setattr(O, "_BUFFERS", {})
    h, w, b = torch.randn(30, 8), torch.randn(50, 8), torch.randn(50)
    y = torch.randint(0, 50, (30,))
    with torch.inference_mode():
        O.linear_cross_entropy(h, w, b, y)
    # the paired RoPE's cached row order, first made under inference_mode, then used in training
    K._pair_rows.cache_clear()
    x, wq = torch.randn(2, 5, 8), torch.randn(24, 8)
    rotary = T.Rotary(4, 500.0)
    with torch.inference_mode():
        K.qkv_rope(x, wq, rotary.cos_sin(torch.arange(5)[None], torch.float32), 2)
    sum(t.sum() for t in K.qkv_rope(x, wq.requires_grad_(), rotary.cos_sin(torch.arange(5)[None], torch.float32), 2)).backward()
    assert wq.grad is not None
    hh = h.clone().requires_grad_()
    O.linear_cross_entropy(hh, w, b, y).backward()
    assert close(hh.grad, torch.autograd.grad(F.cross_entropy(F.linear(h.requires_grad_(), w, b), y, reduction="sum"), h)[0])


def test_linear_cross_entropy_without_grad_and_all_ignored():
    h, w, b = torch.randn(10, 8), torch.randn(20, 8), torch.randn(20)
    y = torch.randint(0, 20, (10,))
    with torch.no_grad():
        assert close(O.linear_cross_entropy(h, w, b, y), F.cross_entropy(F.linear(h, w, b), y, reduction="sum"))
    hh = h.clone().requires_grad_()
    loss = O.linear_cross_entropy(hh, w, b, torch.full((10,), O.IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and hh.grad.abs().max().item() == 0.0


def test_linear_cross_entropy_under_bf16_autocast():
    """The mixed-precision branch (what a GPU runs): bf16 products, fp32 softmax and grads."""
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.2).requires_grad_()
    b = torch.randn(300).requires_grad_()
    y = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
        got = O.linear_cross_entropy(h, w, b, y, chunk_rows=16)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 2e-2 * abs(ref.item())
    ga = torch.autograd.grad(got, (h, w, b))
    gb = torch.autograd.grad(ref, (h, w, b))
    for a, c in zip(ga, gb):
        assert a.dtype == c.dtype
        assert (a - c).abs().max().item() <= 3e-2 * c.abs().max().item()


# -- the model's training path ------------------------------------------------------------------------
V = 256


def model(causal: bool, L: int = 300) -> tuple[Transformer, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    cfg = preset("tiny", causal=causal, **small_vocab_specials(V))
    m = Transformer(cfg)
    with torch.no_grad():
        m.out_bias.normal_()
    x = torch.randint(4, V, (3, L))
    docs = torch.zeros_like(x)
    docs[0, 120:] = 1
    docs[1, 50:] = 1
    docs[1, 260:] = 2
    inp, lab = O.make_batch("clm" if causal else "mlm", x, config=cfg, mask_rate=0.3, doc_ids=docs, generator=torch.Generator().manual_seed(0))
    return m, inp, lab, docs


@pytest.mark.parametrize("causal", [False, True])
def test_training_path_equals_logits_and_cross_entropy(causal):
    m, inp, lab, docs = model(causal)
    ref_m = copy.deepcopy(m)
    where = lab != O.IGNORE
    got = m(inp, doc_ids=docs, labels=lab)
    ref = F.cross_entropy(ref_m(inp, doc_ids=docs, predict_mask=where).float(), lab[where], reduction="sum")
    assert close(got, ref)
    (got / where.sum()).backward()
    (ref / where.sum()).backward()
    for (name, p), q in zip(m.named_parameters(), ref_m.parameters()):
        assert close(p.grad, q.grad), name
    # objectives.loss takes the fused path and agrees with the dense logits
    mean = O.loss(m, inp, lab, doc_ids=docs)
    assert close(mean, ref / where.sum())


def plain_qkv_rope(x, w, rope, heads):
    """The QKV projection and RoPE as plain ops, in the usual order of the head dims."""
    B, L, H = x.shape
    qkv = F.linear(x, w).view(B, L, 3, heads, H // heads)
    qkv = torch.cat((T.apply_rotary(qkv[:, :, :2], *rope), qkv[:, :, 2:]), dim=2)
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


@pytest.mark.parametrize("causal", [False, True])
def test_fast_kernels_equal_plain_pytorch(causal, monkeypatch):
    """oneDNN linears, the RoPE/GeGLU functions and banded attention vs F.linear, plain ops and the
    full-mask SDPA: logits and every gradient of a training step."""
    m, inp, lab, docs = model(causal, L=400)
    am = torch.ones_like(inp)
    am[2, 350:] = 0
    plain = copy.deepcopy(m)
    where = lab != O.IGNORE

    def run(net, fast: bool):
        with monkeypatch.context() as mp:
            if not fast:
                mp.setattr(C, "use_onednn", lambda x, w: False)
                mp.setattr(T, "qkv_rope", plain_qkv_rope)
                mp.setattr(K._GeGLU, "apply", lambda x: F.gelu(x.chunk(2, -1)[0]) * x.chunk(2, -1)[1])
                mp.setattr(A, "band_plan", lambda *a, **k: None)
                mp.setattr(A, "span_plan", lambda *a, **k: None)
            else:
                assert A.band_plan(A.fold_padding(docs, am, inp.shape, "cpu"), 3, 400, "cpu", causal=causal, window=net.config.window(), block=net.band_block) is not None
            logits = net(inp, doc_ids=docs, attention_mask=am, predict_mask=where)
            F.cross_entropy(logits, lab[where]).backward()
            return logits

    a, b = run(m, True), run(plain, False)
    assert close(a, b)
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        assert close(p.grad, q.grad), name
        # relative to each gradient's own size too (most are far below 1): ~1e-6 measured
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max(), name


def test_onednn_linear_matches_f_linear():
    assert C.linear_choice()["linear"] == "onednn"  # conftest forces it: the path under test
    torch.manual_seed(0)
    for shape, (n, k), bias in [((4, 30, 16), (48, 16), False), ((70, 24), (10, 24), True), ((5, 8), (300, 8), True)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        b = torch.randn(n, requires_grad=True) if bias else None
        ins = [t for t in (x, w, b) if t is not None]
        y = T.linear(x, w, b)
        r = F.linear(x, w, b)
        assert close(y, r)
        go = torch.randn_like(r)
        for a, c in zip(torch.autograd.grad(y, ins, go), torch.autograd.grad(r, ins, go)):
            assert close(a, c)


@pytest.mark.parametrize("tile,per_row", [(None, True), (4, True), (4, False), (20, True), (20, False)])
def test_rope_and_geglu_functions_match_plain_ops(tile, per_row, monkeypatch):
    """``tile``: positions per rotation step (4: pieces of one row; 20: two rows at a time, then
    the odd one); ``per_row``: a cos/sin per row (documents) or one shared by all rows."""
    if tile is not None:
        monkeypatch.setattr(K, "ROPE_CHUNK", tile)
    torch.manual_seed(0)
    B, L, h, D = 3, 9, 3, 8
    pos = (torch.arange(L) + 4 * torch.arange(B)[:, None]) % 7 if per_row else torch.arange(L)[None]  # rows differ
    cos, sin = T.Rotary(D, 500.0).cos_sin(pos, torch.float32)
    qkv = torch.randn(B, L, 3, h, D, requires_grad=True)
    got = T._RopeQKV.apply(qkv, cos, sin)

    def rotate_half(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    # the textbook form (transformers'): x * cos + rotate_half(x) * sin with emb = cat(freqs, freqs)
    freqs = pos[..., None].float() * (1.0 / 500.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    emb = torch.cat((freqs, freqs), -1)
    c, s = emb.cos()[:, :, None, None], emb.sin()[:, :, None, None]
    ref = torch.cat((qkv[:, :, :2] * c + rotate_half(qkv[:, :, :2]) * s, qkv[:, :, 2:]), dim=2)
    assert close(got, ref)
    go = torch.randn_like(ref)
    assert close(torch.autograd.grad(got, qkv, go)[0], torch.autograd.grad(ref, qkv, go)[0])
    # rope_split: the same, as [B, heads, L, D] views; the gradient of any subset of q, k, v
    split = K.rope_split(qkv, cos, sin)
    ref = torch.cat((qkv[:, :, :2] * c + rotate_half(qkv[:, :, :2]) * s, qkv[:, :, 2:]), dim=2)
    for a, r in zip(split, ref.unbind(2)):
        assert close(a, r.transpose(1, 2))
    for used in [(0, 1, 2), (0, 2), (1,)]:
        gos = [torch.randn_like(split[i]) for i in used]
        a = torch.autograd.grad([split[i] for i in used], qkv, gos, retain_graph=True)[0]
        b = torch.autograd.grad([ref.unbind(2)[i].transpose(1, 2) for i in used], qkv, gos, retain_graph=True)[0]
        assert close(a, b)
    x = torch.randn(4, 6, 10, requires_grad=True)
    a, gate = x.chunk(2, -1)
    ref = F.gelu(a) * gate
    got = T.geglu(x)
    assert close(got, ref)
    with torch.no_grad():  # inference: the product is written into gelu's output
        assert close(T.geglu(x), ref)
    go = torch.randn_like(ref)
    assert close(torch.autograd.grad(got, x, go)[0], torch.autograd.grad(ref, x, go)[0])


@pytest.mark.parametrize("per_row", [True, False])
def test_paired_rope_equals_plain_rope(per_row):
    """qkv_rope's fp32 path (q and k rows reordered into pairs, RoPE as complex products) vs the
    plain projection + rotate-half: q and k equal once put back in order, v equal, and the
    gradients of x and of the weight (in its own order) equal, also for a subset of q, k, v."""
    torch.manual_seed(0)
    B, L, heads, D = 3, 11, 2, 8
    pos = (torch.arange(L) + 3 * torch.arange(B)[:, None]) % 9 if per_row else torch.arange(L)[None]
    rope = T.Rotary(D, 500.0).cos_sin(pos, torch.float32)
    x = torch.randn(B, L, heads * D, requires_grad=True)
    w = torch.randn(3 * heads * D, heads * D, requires_grad=True)
    got = K.qkv_rope(x, w, rope, heads)
    ref = plain_qkv_rope(x, w, rope, heads)

    def in_order(t):  # pairs (i, i + D/2) side by side -> i in the first half, i + D/2 in the second
        return t.unflatten(-1, (D // 2, 2)).transpose(-1, -2).flatten(-2)

    got = (in_order(got[0]), in_order(got[1]), got[2])
    for a, r in zip(got, ref):
        assert close(a, r)
    for used in [(0, 1, 2), (0, 2), (1,)]:
        gos = [torch.randn_like(ref[i]) for i in used]
        ga = torch.autograd.grad([got[i] for i in used], (x, w), gos, retain_graph=True)
        gr = torch.autograd.grad([ref[i] for i in used], (x, w), gos, retain_graph=True)
        for a, c in zip(ga, gr):
            assert close(a, c)


def test_full_masks_without_gradients_across_calls(monkeypatch):
    """Forwards whose global and local layers both attend under full masks (bands and spans off),
    without gradients and several times with other documents, equal the forward with gradients
    (each mask made once per forward and shared by its layers)."""
    monkeypatch.setattr(A, "band_plan", lambda *a, **k: None)
    monkeypatch.setattr(A, "span_plan", lambda *a, **k: None)
    torch.manual_seed(0)
    cfg = preset("tiny", **small_vocab_specials(V)).replace(layers=4)  # global, local, local, global
    assert [cfg.is_global_layer(i) for i in range(4)] == [True, False, False, True]
    m = Transformer(cfg).eval()
    _, inp, _, docs = model(False, L=200)
    other = docs.clone()
    other[2, 100:] = 1
    for d in (docs, other, docs):
        ref = m.encode(inp, doc_ids=d)
        with torch.no_grad():
            got = m.encode(inp, doc_ids=d)
        assert torch.equal(got, ref)


def _same_as_full_mask(attend, docs, B: int, L: int, h: int, D: int, *, causal: bool, window) -> None:
    """``attend`` (q, k, v as the block passes them) == SDPA with the full L x L mask: output and gradients."""
    q, k, v = (torch.randn(B, L, h, D, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # the block's layout: [B, h, L, D] views
    ref = A.sdpa(qt, kt, vt, A.sdpa_mask(docs, L, "cpu", causal=causal, window=window), causal=causal)
    got = attend(qt, kt, vt)
    assert close(got, ref)
    go = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(got, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        assert close(a, c)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [256, 300, 700])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_banded_attention_equals_full_mask(causal, L, with_docs, block):
    torch.manual_seed(L + block)
    B, h, D = 2, 3, 16
    window = (63, 0) if causal else (64, 64)
    docs = None
    if with_docs:
        d = torch.zeros(B, L, dtype=torch.long)
        d[0, L // 3:] = 1
        d[0, L // 2:] = 2
        am = torch.ones(B, L, dtype=torch.long)
        am[1, L - 40:] = 0  # right padding
        docs = A.fold_padding(d, am, (B, L), "cpu")
    plan = A.band_plan(docs, B, L, "cpu", causal=causal, window=window, block=block)
    if plan is None:  # bands would not save work at this length: the model keeps the full mask
        assert L * block >= 256 * 64  # only short sequences with coarse blocks fall back
        return
    _same_as_full_mask(plan.attend, docs, B, L, h, D, causal=causal, window=window)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (16, 16)])
def test_full_mask_made_additive_once_equals_boolean_mask(causal, window):
    """FullMask (the global layers' full-mask path) == SDPA given the boolean mask, output and
    gradients; the additive mask is made once per dtype and reused by later calls."""
    torch.manual_seed(3)
    B, L, h, D = 2, 96, 2, 8
    d = torch.zeros(B, L, dtype=torch.long)
    d[0, 40:] = 1
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 70:] = 0
    docs = A.fold_padding(d, am, (B, L), "cpu")
    full = A.FullMask(A.sdpa_mask(docs, L, "cpu", causal=causal, window=window), causal=causal)
    for _ in range(2):  # the second call reads the cached mask
        _same_as_full_mask(full.attend, docs, B, L, h, D, causal=causal, window=window)
    assert list(full._masks) == [torch.float32]
    m = full._masks[torch.float32]
    assert bool((m == 0).eq(full.allowed).all()) and bool(torch.isneginf(m[~full.allowed.expand_as(m)]).all())
    q = torch.randn(B, h, L, D, dtype=torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, q, q, attn_mask=full.allowed)
    assert close(full.attend(q, q, q).float(), ref.float(), tol=2e-2)
    assert set(full._masks) == {torch.float32, torch.bfloat16}
    assert A.FullMask(None, causal=causal).attend(q, q, q).equal(F.scaled_dot_product_attention(q, q, q, is_causal=causal))


def _packed_docs(B: int, L: int, seed: int, pad: int = 0) -> torch.Tensor:
    """Packed rows of documents 5 to 200 tokens long; ``pad`` right-padding positions in row 0."""
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        p = int(torch.randint(1, 120, (1,), generator=g))
        while p < L:
            d[b, p:] += 1
            p += int(torch.randint(5, 200, (1,), generator=g))
    am = torch.ones(B, L, dtype=torch.long)
    if pad:
        am[0, L - pad:] = 0
    return A.fold_padding(d, am, (B, L), "cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,block", [(300, 32), (512, 64), (700, 64), (513, 128)])
@pytest.mark.parametrize("window", [None, (40, 40)])
def test_span_attention_equals_full_mask(causal, L, block, window):
    torch.manual_seed(L + block)
    B, h, D = 3, 2, 16
    if causal and window is not None:
        window = (window[0], 0)
    docs = _packed_docs(B, L, L, pad=37)
    plan = A.SpanPlan(docs, B, L, "cpu", causal=causal, window=window, block=block, grain=block)
    assert plan.work < B * L * L  # documents leave keys out
    _same_as_full_mask(plan.attend, docs, B, L, h, D, causal=causal, window=window)


@pytest.mark.parametrize("causal", [False, True])
def test_span_attention_in_row_groups_equals_full_mask(causal, monkeypatch):
    """Rows go to the span plans in groups of SPAN_TOKENS (here 2 rows of 1,500 and 1 row)."""
    monkeypatch.setattr(A, "SPAN_TOKENS", 3000)
    torch.manual_seed(1)
    B, L, h, D = 3, 1500, 2, 8
    docs = _packed_docs(B, L, 11, pad=100)
    plan = A.span_plan(docs, B, L, "cpu", causal=causal)
    assert plan is not None and plan.rows == [2, 1]
    _same_as_full_mask(plan.attend, docs, B, L, h, D, causal=causal, window=None)


def test_span_plan_is_used_only_where_it_is_exact_and_saves_work():
    L = 512
    docs = _packed_docs(2, L, 3)
    assert A.span_plan(docs, 2, L, "cpu", causal=True) is not None
    assert A.span_plan(None, 2, L, "cpu", causal=True) is None  # no documents: plain SDPA
    one = torch.zeros(2, L, dtype=torch.long)
    assert A.span_plan(one, 2, L, "cpu", causal=False) is None  # one document per row: nothing to save
    split = docs.clone()
    split[1, 10:20] = split[1, 400]  # one document in two pieces: a span would miss keys
    assert A.span_plan(split, 2, L, "cpu", causal=True) is None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layers", [3, 4])  # the last block local (3) or global (4)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_last_block_at_labelled_rows_equals_whole_block(causal, layers, dropout, monkeypatch):
    calls = []
    whole = T.Block.forward_at
    monkeypatch.setattr(T.Block, "forward_at", lambda self, *a: calls.append(1) or whole(self, *a))
    torch.manual_seed(layers)
    V, B, L = 128, 3, 90
    cfg = preset("micro", causal=causal, objective="clm" if causal else "mlm", attn_out_dropout=dropout,
                 **small_vocab_specials(V)).replace(layers=layers)
    m = Transformer(cfg)
    m.train()
    assert m.blocks[-1].is_global == (layers == 4)
    ids = torch.randint(0, V, (B, L))
    docs = torch.zeros(B, L, dtype=torch.long)
    docs[0, 30:] = 1
    docs[2, 10:] = 1
    docs[2, 60:] = 2
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 70:] = 0
    labels = torch.full((B, L), O.IGNORE)
    sel = (torch.rand(B, L) < 0.3) & am.bool()
    labels[sel] = ids[sel]
    plain = copy.deepcopy(m)
    plain.sparse_last_layer = False
    out = []
    for net in (m, plain):
        torch.manual_seed(7)  # the same dropout draws
        loss = net(ids, doc_ids=docs, attention_mask=am, labels=labels)
        loss.backward()
        out.append(loss)
    assert calls == [1]  # the sparse path ran once (the model), the plain one never
    assert close(out[0], out[1])
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        assert close(p.grad, q.grad), name


# -- optimizer -----------------------------------------------------------------------------------------
def _optimi_reference(model, cfg):
    from optimi import StableAdamW

    from ettin.train.optim import param_groups

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, decouple_lr=True, max_lr=cfg.lr, foreach=False)


def test_trainer_optimizer_matches_optimi_over_steps_and_resumes():
    from ettin.train.optim import build_optimizer, set_lr
    from ettin.train.recipe import OptimSection

    torch.manual_seed(0)
    cfg = OptimSection(lr=3e-2, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.1)
    a = Transformer(preset("micro", **small_vocab_specials(64)))
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg), _optimi_reference(b, cfg)
    assert opt_a.param_groups[0]["foreach"]  # the faster path is the one under test
    x = torch.randint(4, 64, (2, 40))
    lab = O.make_batch("mlm", x, config=a.config, mask_rate=0.3, generator=torch.Generator().manual_seed(0))[1]
    for step in range(6):
        lr = cfg.lr * (0.5 if step % 2 else 1.0)  # decay follows lr / peak
        for net, opt in ((a, opt_a), (b, opt_b)):
            set_lr(opt, lr)
            (O.loss(net, x, lab) * (1e3 if step == 3 else 1.0)).backward()  # a spike: update clipping engages
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, q in zip(a.parameters(), b.parameters()):
            assert (p - q).abs().max().item() <= 1e-6
    # state_dict round trip: a fresh optimizer continues exactly where this one is
    c = copy.deepcopy(a)
    opt_c = build_optimizer(c, cfg)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for net, opt in ((a, opt_a), (c, opt_c)):
        O.loss(net, x, lab).backward()
        opt.step()
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_optimizer_step_hooks_run_once_per_step():
    """Also after optimi's own class has been instantiated (torch then wraps its step as well)."""
    from optimi import StableAdamW

    from ettin.train.optim import build_optimizer
    from ettin.train.recipe import OptimSection

    StableAdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    m = torch.nn.Linear(4, 3)
    opt = build_optimizer(m, OptimSection(lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_optimizer_with_an_empty_group_and_missing_grads():
    from ettin.train.optim import build_optimizer
    from ettin.train.recipe import OptimSection

    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.randn(4, 3))
    m.v = torch.nn.Parameter(torch.randn(5, 2))
    opt = build_optimizer(m, OptimSection(lr=0.1))  # the no-decay group is empty
    m.w.grad = torch.randn(4, 3)  # m.v has no gradient this step
    v0 = m.v.detach().clone()
    opt.step()
    assert torch.equal(m.v, v0)


def test_cpu_allocator_tuning_is_idempotent():
    first = T.tune_cpu_allocator()
    assert T.tune_cpu_allocator() is True and isinstance(first, bool)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout):
    """Also with dropout: the recomputed blocks (the last one at the masked rows) draw the same masks."""
    m, inp, lab, docs = model(False)
    m.set_attn_out_dropout(dropout)
    ck = copy.deepcopy(m)
    ck.activation_checkpointing = True
    for net in (m, ck):
        net.train()
        torch.manual_seed(3)
        net(inp, doc_ids=docs, labels=lab).backward()
    for (name, p), q in zip(m.named_parameters(), ck.parameters()):
        assert close(p.grad, q.grad), name
