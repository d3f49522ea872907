import math

import pytest
import torch

from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer
from ettin.model import attention as A

V = 128


def tiny(causal, **kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", causal=causal, **small_vocab_specials(V), **kw)).eval()


def test_init_statistics():
    torch.manual_seed(0)
    m = Transformer(preset("17m")).eval()
    std_out = 0.02 / math.sqrt(2 * 7)
    assert abs(m.embed.weight.std().item() - 0.02 * 0.88) < 0.002  # truncation at 2 sigma shrinks std to ~0.88
    assert m.embed.weight.abs().max().item() <= 0.04 + 1e-7
    assert abs(m.blocks[0].wo.weight.std().item() - std_out * 0.88) < 0.0005
    assert torch.all(m.out_bias == 0)
    assert isinstance(m.blocks[0].attn_norm, torch.nn.Identity)
    assert [b.is_global for b in m.blocks] == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("causal", [False, True])
def test_direction_really_switches(causal):
    m = tiny(causal)
    x = torch.randint(4, V, (1, 40))
    y = x.clone()
    y[0, 30:] = torch.randint(4, V, (10,))
    with torch.no_grad():
        a, b = m(x), m(y)
    changed_before = (a[0, :30] - b[0, :30]).abs().max().item()
    if causal:
        assert changed_before == 0.0
    else:
        assert changed_before > 1e-4


def test_documents_are_isolated_and_positions_restart():
    m = tiny(False)
    a = torch.randint(4, V, (1, 20))
    b = torch.randint(4, V, (1, 15))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 20 + [1] * 15])
    with torch.no_grad():
        lp = m(packed, doc_ids=docs)
        la, lb = m(a), m(b)
    assert (lp[0, :20] - la[0]).abs().max() < 1e-5
    assert (lp[0, 20:] - lb[0]).abs().max() < 1e-5


def test_positions_from_docs():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    pos = A.positions_from_docs(docs, docs.shape, "cpu")
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("causal", [False, True])
def test_local_window_bounds(causal):
    """Gradient of output i w.r.t. input j is non-zero exactly inside the window (1 local layer)."""
    cfg = preset("micro", causal=causal, **small_vocab_specials(V)).replace(layers=2, global_every=2)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    L, i = 200, 100
    emb = m.embed_norm(m.embed(torch.randint(4, V, (1, L)))).detach().requires_grad_(True)
    pos = torch.arange(L)[None]
    rope = m.rope_local.cos_sin(pos, emb.dtype)
    _, attend_l = m._attention_fns(None, 1, L, emb.device)
    out = m.blocks[1](emb, rope, attend_l)
    out[0, i].sum().backward()
    seen = (emb.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    left, right = cfg.window()
    assert seen == list(range(i - left, i + right + 1))


def test_sparse_prediction_equals_dense_rows():
    m = tiny(False)
    x = torch.randint(4, V, (2, 50))
    where = torch.rand(2, 50) < 0.3
    with torch.no_grad():
        dense = m(x)
        sparse = m(x, predict_mask=where)
    assert torch.allclose(dense[where], sparse, atol=1e-6)


def test_padding_does_not_change_real_positions():
    m = tiny(True)
    x = torch.randint(4, V, (1, 30))
    padded = torch.cat([x, torch.full((1, 10), 2)], 1)
    am = torch.cat([torch.ones(1, 30), torch.zeros(1, 10)], 1).long()
    with torch.no_grad():
        a = m(x)
        b = m(padded, attention_mask=am)
    assert (a - b[:, :30]).abs().max() < 1e-5
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_and_flex_agree(causal):
    """Flex attention (the default on GPU) and SDPA give the same outputs: documents + windows."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = tiny(causal).to(dev)
    x = torch.randint(4, V, (2, 300), device=dev)
    docs = (torch.arange(300, device=dev) // 70).expand(2, 300).contiguous()
    with torch.no_grad():
        m.attn_impl = "sdpa"
        a = m(x, doc_ids=docs)
        m.attn_impl = "flex"
        b = m(x, doc_ids=docs)
    assert (a - b).abs().max() < 1e-4
