import torch

from ettin import objectives as O
from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer

V = 1000
SPECIALS = (0, 1, 2, 3)


def sample(n=200, L=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, V, (n, L), generator=g)
    x[:, 0] = 0
    x[:, 100] = 1
    x[:, 101] = 0
    return x


def test_mlm_rates_and_80_10_10():
    x = sample()
    g = torch.Generator().manual_seed(1)
    inp, lab = O.mlm(x, rate=0.3, mask_id=3, special_ids=SPECIALS, random_ids=V, generator=g)
    sel = lab != O.IGNORE
    eligible = ~torch.isin(x, torch.tensor(SPECIALS))
    assert not sel[~eligible].any(), "special tokens are never selected"
    rate = sel.sum().item() / eligible.sum().item()
    assert abs(rate - 0.3) < 0.005
    assert torch.equal(lab[sel], x[sel])
    masked = (inp == 3) & sel
    same = (inp == x) & sel
    rand = sel & ~masked & ~same
    n = sel.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # "unchanged" also catches random draws equal to the original (1/V of the 10%)
    assert abs(same.sum().item() / n - 0.1) < 0.01
    assert abs(rand.sum().item() / n - 0.1) < 0.01
    assert torch.equal(inp[~sel], x[~sel])


def test_mlm_rate_15_and_determinism():
    x = sample(seed=3)
    a = O.mlm(x, rate=0.15, mask_id=3, special_ids=SPECIALS, random_ids=V, generator=torch.Generator().manual_seed(5))
    b = O.mlm(x, rate=0.15, mask_id=3, special_ids=SPECIALS, random_ids=V, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sel = a[1] != O.IGNORE
    assert abs(sel.float().sum().item() / (~torch.isin(x, torch.tensor(SPECIALS))).sum().item() - 0.15) < 0.005


def test_clm_shift_and_document_boundaries():
    x = torch.tensor([[0, 10, 11, 1, 0, 20, 21, 1, 2, 2]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]])
    am = torch.tensor([[1] * 8 + [0, 0]])
    lab = O.clm(x, doc_ids=docs, attention_mask=am, pad_id=2)
    assert lab.tolist() == [[10, 11, 1, -100, 20, 21, 1, -100, -100, -100]]


def test_mntp_shift_first_token_and_specials():
    x = sample(n=100, L=300, seed=7)
    docs = torch.zeros_like(x)
    docs[:, 101:] = 1  # document 1 starts at the CLS at position 101
    g = torch.Generator().manual_seed(2)
    inp, lab = O.mntp(x, rate=0.15, mask_id=3, special_ids=SPECIALS, random_ids=V, doc_ids=docs, generator=g)
    # the target of output i-1 is the (original) token at i, where i was selected
    tgt_pos = torch.zeros_like(x, dtype=torch.bool)
    tgt_pos[:, 1:] = lab[:, :-1] != O.IGNORE
    assert torch.equal(lab[:, :-1][tgt_pos[:, 1:]], x[tgt_pos])
    assert (lab[:, -1] == O.IGNORE).all()
    # selected positions are never specials, never the first token of a document
    assert not tgt_pos[:, 0].any() and not tgt_pos[:, 101].any()
    assert not torch.isin(x[tgt_pos], torch.tensor(SPECIALS)).any()
    # the selected tokens were corrupted 80/10/10 like MLM
    assert abs((inp[tgt_pos] == 3).float().mean().item() - 0.8) < 0.02
    assert abs(tgt_pos.sum().item() / (~torch.isin(x, torch.tensor(SPECIALS))).sum().item() - 0.15) < 0.01


def test_loss_uses_sparse_prediction():
    torch.manual_seed(0)
    cfg = preset("micro", **small_vocab_specials(64))
    m = Transformer(cfg)
    x = torch.randint(4, 64, (2, 32))
    inp, lab = O.make_batch("mlm", x, config=cfg, mask_rate=0.3, generator=torch.Generator().manual_seed(0))
    loss = O.loss(m, inp, lab)
    dense = torch.nn.functional.cross_entropy(m(inp).reshape(-1, 64), lab.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - dense.item()) < 1e-5
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near-uniform at init
