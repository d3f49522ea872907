"""The GPU training configuration, checked on a CPU: compiled blocks, flex attention, switches.

On a GPU the trainer compiles every block (``model.compile: auto``) and attends through flex
attention block masks built each step from the batch's documents. Flex attention has no
backward on a CPU, so its forward is checked here (values equal to SDPA, no recompilation when
only the documents change), and compiled training through SDPA for equal gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from ettin.config import preset, small_vocab_specials
from ettin.model import Transformer
from ettin.model import attention as A
from ettin.train.recipe import load_recipe
from ettin.train.trainer import train

V = 512


def pair_of_models(causal: bool) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    a = Transformer(preset("tiny", causal=causal, **small_vocab_specials(V)))
    b = Transformer(a.config)
    b.load_state_dict(a.state_dict())
    return a, b


def packed_docs(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, L), generator=g).sort(dim=1).values


@pytest.mark.skipif(not A.HAVE_FLEX, reason="this torch has no flex attention")
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_flex_blocks_equal_sdpa_without_recompiling(causal):
    import torch._dynamo.utils as du

    torch._dynamo.reset()
    fast, ref = pair_of_models(causal)
    fast.eval().compile_blocks()
    fast.attn_impl, ref.attn_impl = "flex", "sdpa"
    ref.eval()
    graphs = []
    for step in range(4):  # new documents every step, as in training (sequence > window)
        x = torch.randint(4, V, (2, 256), generator=torch.Generator().manual_seed(step))
        docs = packed_docs(2, 256, step)
        with torch.no_grad():
            diff = (fast(x, doc_ids=docs) - ref(x, doc_ids=docs)).abs().max().item()
        assert diff < 1e-5, (step, diff)
        graphs.append(du.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], f"recompiled when only the documents changed: {graphs}"


def test_compiled_blocks_train_like_eager():
    """Compiled blocks (SDPA, documents, banded local layers) give eager's loss and gradients."""
    torch._dynamo.reset()
    fast, ref = pair_of_models(False)
    fast.compile_blocks()
    x = torch.randint(4, V, (2, 200), generator=torch.Generator().manual_seed(1))
    docs = packed_docs(2, 200, 1)
    y = torch.where(torch.rand(2, 200, generator=torch.Generator().manual_seed(2)) < 0.3, x, -100)
    la = fast(x, doc_ids=docs, labels=y)
    lb = ref(x, doc_ids=docs, labels=y)
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-4 * abs(lb.item())
    ga = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert (ga[name].grad - p.grad).abs().max() <= 1e-4 * max(1.0, p.grad.abs().max().item()), name


def test_recipe_switches_compile_and_document_masking(tiny_data, tmp_path, monkeypatch):
    r = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_data))[0]
    assert r.model.compile == "auto" and r.train.document_masking is True
    for bad, msg in (({"model.compile": "sometimes"}, "'model.compile' must be one of auto, True, False"),
                     ({"train.document_masking": "no"}, "'train.document_masking' must be true or false")):
        from ettin.errors import EttinError

        with pytest.raises(EttinError, match=msg):
            load_recipe(write_recipe(tmp_path / "b.yaml", tiny_data, **bad))

    seen = []
    orig = Transformer.forward

    def spy(self, input_ids, **kw):
        seen.append(kw.get("doc_ids"))
        return orig(self, input_ids, **kw)

    monkeypatch.setattr(Transformer, "forward", spy)
    losses = {}
    for masking in (True, False):
        seen.clear()
        rec = write_recipe(tmp_path / f"m{masking}.yaml", tiny_data, **{"train.tokens": 2 * 8 * 256, "train.seq_len": 256, "train.document_masking": masking})
        train(rec, tmp_path / f"run{masking}", progress=False)
        assert seen and all((d is None) != masking for d in seen)
        rows = [json.loads(line) for line in Path(tmp_path / f"run{masking}" / "metrics.jsonl").read_text().splitlines()]
        losses[masking] = [row["loss"] for row in rows]
        assert len(rows) == 2
    assert losses[True][0] != losses[False][0]  # rows hold several documents: attention differs
