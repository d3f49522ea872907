import pytest
import torch

from ettin.config import preset, small_vocab_specials
from ettin.errors import EttinError
from ettin.eval import finetune as ft
from ettin.model import Transformer
from ettin.model import packing as P

V = 512
PAD = 2


def tiny(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", causal=causal, **small_vocab_specials(V))).eval()


def random_seqs(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, V, (k,), generator=g).tolist() for k in lens]


def test_pack_invariants():
    seqs = random_seqs(60, 1, 100, seed=1)
    p = P.pack(seqs, 128, pad_id=PAD)
    R, L = p.input_ids.shape
    assert L <= 128 and L % 8 == 0
    assert p.doc_ids.shape == (R, L) and p.spans.shape == (60, 3)
    for i, s in enumerate(seqs):
        r, start, n = p.spans[i].tolist()
        assert n == len(s) and start + n <= L
        assert p.input_ids[r, start:start + n].tolist() == s
    # every token exactly once: each sequence's id covers exactly its length, the rest is padding
    counts = torch.bincount(p.doc_ids[p.doc_ids >= 0], minlength=60)
    assert counts.tolist() == [len(s) for s in seqs]
    pads = p.doc_ids == P.PAD_DOC
    assert (p.input_ids[pads] == PAD).all()
    assert int((~pads).sum()) == p.real_tokens == sum(map(len, seqs))
    # no row opened needlessly: first-fit leaves at most one row at most half full
    fill = (~pads).sum(1)
    assert int((fill <= 64).sum()) <= 1
    q = P.pack(seqs, 128, pad_id=PAD)  # deterministic
    assert torch.equal(p.input_ids, q.input_ids) and torch.equal(p.doc_ids, q.doc_ids) and torch.equal(p.spans, q.spans)


def test_pack_first_fit_decreasing_layout_and_trim():
    seqs = [[7] * n for n in (3, 5, 1, 4, 3, 2)]
    p = P.pack(seqs, 8, pad_id=0)
    # longest first into the first row with room: 5->r0, 4->r1, 3->r0, 3->r1, 2->r2, 1->r1
    assert p.spans.tolist() == [[0, 5, 3], [0, 0, 5], [1, 7, 1], [1, 0, 4], [1, 4, 3], [2, 0, 2]]
    assert p.input_ids.shape == (3, 8)
    short = P.pack([[1, 2, 3], [4]], 512, pad_id=0)  # trimmed to the filled length, a multiple of 8
    assert short.input_ids.shape == (1, 8)
    assert short.doc_ids.tolist() == [[0, 0, 0, 1, -1, -1, -1, -1]]


def test_pack_rejects_bad_sequences():
    with pytest.raises(EttinError, match="sequence 2 has 9 tokens"):
        P.pack([[1], [2, 3], [4] * 9], 8, pad_id=0)
    with pytest.raises(EttinError, match="sequence 1 is empty"):
        P.pack([[1], []], 8, pad_id=0)
    with pytest.raises(EttinError, match="unknown pooling"):
        P.pooled(tiny(False), [[1, 2]], pad_id=PAD, pooling="max")


def alone(model, seqs, pooling):
    """Reference: every sequence on its own, no padding, no packing."""
    out = []
    with torch.no_grad():
        for s in seqs:
            h = model.encode(torch.tensor([s]))[0]
            out.append({"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling])
    return torch.stack(out)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_padded(causal):
    m = tiny(causal)
    assert max(m.config.window()) < 150  # sequences reach past the local window
    seqs = random_seqs(30, 1, 300, seed=2)
    for pooling in P.POOLINGS:
        ref = alone(m, seqs, pooling)
        packed = P.pooled(m, seqs, pad_id=PAD, pooling=pooling, strategy="packed", row_len=512, token_budget=1024)
        padded = P.pooled(m, seqs, pad_id=PAD, pooling=pooling, strategy="padded", token_budget=1024)
        assert packed.shape == (30, m.config.hidden) and packed.dtype == torch.float32
        assert (packed - padded).abs().max() <= 1e-5, pooling
        assert (packed - ref).abs().max() <= 1e-5, pooling
    assert m.training is False
    m.train()
    P.pooled(m, seqs[:3], pad_id=PAD, strategy="packed")
    assert m.training is True  # the mode is restored


@pytest.mark.parametrize("strategy", ["packed", "padded"])
def test_cls_and_last_pooling_run_the_last_block_at_the_pooled_rows_only(strategy, monkeypatch):
    """cls / last pooling reads one position per sequence: the last block computes only those
    (Block.forward_at), and the vectors equal the whole forward's (test_packed_equals_padded)."""
    from ettin.model.transformer import Block

    m = tiny(True)
    seqs = random_seqs(9, 2, 120, seed=6)
    kept = []
    orig = Block.forward_at

    def spy(self, x, rope, keep, attend_rows):
        kept.append(int(keep.sum()))
        return orig(self, x, rope, keep, attend_rows)

    monkeypatch.setattr(Block, "forward_at", spy)
    for pooling in ("cls", "last"):
        kept.clear()
        got = P.pooled(m, seqs, pad_id=PAD, pooling=pooling, strategy=strategy, row_len=256, token_budget=512)
        assert sum(kept) == len(seqs) and len(kept) >= 2  # every sequence once, over several passes
        assert (got - alone(m, seqs, pooling)).abs().max() <= 1e-5
    kept.clear()
    P.pooled(m, seqs, pad_id=PAD, pooling="mean", strategy=strategy, row_len=256, token_budget=512)
    assert kept == []  # mean pooling reads every position: the whole last block


def test_auto_strategy_and_normalize():
    m = tiny(False)
    assert P.choose_strategy(m, "cpu") == "padded"  # SDPA on a CPU, long or unknown lengths: full L x L per row
    assert P.choose_strategy(m, "cpu", longest=2048) == "padded"
    assert P.choose_strategy(m, "cpu", longest=512) == "packed"  # short rows: packing measured faster
    m.attn_impl = "flex"
    assert P.choose_strategy(m, "cpu") == ("packed" if P.A.HAVE_FLEX else "padded")
    m.attn_impl = "auto"
    seqs = random_seqs(5, 3, 40, seed=3)
    e = P.pooled(m, seqs, pad_id=PAD, normalize=True)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5))
    assert P.pooled(m, [], pad_id=PAD).shape == (0, m.config.hidden)


@pytest.mark.skipif(not P.A.HAVE_FLEX, reason="no flex attention in this torch")
def test_packed_with_flex_on_cpu():
    """Compiled flex attention (the CUDA default) on packed rows gives the padded SDPA result."""
    m = tiny(False)
    seqs = random_seqs(12, 1, 200, seed=4)
    ref = P.pooled(m, seqs, pad_id=PAD, pooling="mean", strategy="padded")
    m.attn_impl = "flex"
    got = P.pooled(m, seqs, pad_id=PAD, pooling="mean", strategy="packed", row_len=200)  # L=200: not a multiple of 128
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("causal,pooling", [(False, "mean"), (False, "cls"), (True, "last"), (True, "mean")])
def test_finetune_embed_matches_padded_reference(causal, pooling):
    """finetune.embed keeps its results: the padded, longest-first computation it used to run."""
    m = tiny(causal)
    seqs = random_seqs(23, 2, 200, seed=5)
    ref = torch.zeros(23, m.config.hidden)
    order = sorted(range(23), key=lambda i: -len(seqs[i]))
    with torch.no_grad():
        for s in range(0, 23, 4):
            chunk = order[s:s + 4]
            x, am, lengths = ft.pad_batch([seqs[i] for i in chunk], PAD, "cpu")
            ref[chunk] = ft.pool(m.encode(x, attention_mask=am), lengths, pooling).float()
    got = ft.embed(m, seqs, pad_id=PAD, pooling=pooling, batch_size=4)
    assert (got - ref).abs().max() <= 1e-5
    got_n = ft.embed(m, seqs, pad_id=PAD, pooling=pooling, batch_size=4, normalize=True)
    assert (got_n - torch.nn.functional.normalize(ref, dim=-1)).abs().max() <= 1e-5
    m.attn_impl = "sdpa"
    packed = P.pooled(m, seqs, pad_id=PAD, pooling=pooling, strategy="packed", token_budget=4 * 200, max_rows=4)
    assert (packed - ref).abs().max() <= 1e-5
    assert ft.embed(m, [], pad_id=PAD, pooling=pooling, batch_size=4).shape == (0, m.config.hidden)
