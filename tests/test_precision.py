"""``--precision bf16`` for inference and evaluation: close to fp32, refused where the CPU lacks bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ettin.cli import app
from ettin.config import preset, small_vocab_specials
from ettin.errors import EttinError
from ettin.model import Transformer
from ettin.model import cpu as C
from ettin.model.packing import pooled


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Run the bf16 path here whatever this CPU is (autocast bf16 works everywhere, just slowly without AVX512-BF16)."""
    monkeypatch.setenv("ETTIN_ALLOW_BF16", "1")


def test_bf16_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.delenv("ETTIN_ALLOW_BF16", raising=False)
    monkeypatch.setattr(C, "bf16_supported", lambda: False)
    with pytest.raises(EttinError, match="neither AVX512-BF16 nor AMX-BF16") as e:
        C.check_precision("bf16", "cpu")
    assert "\n" not in str(e.value)
    assert C.check_precision("fp32", "cpu") == "fp32"
    assert C.check_precision(None, "cpu") == "fp32"
    with pytest.raises(EttinError, match="expected one of fp32, bf16"):
        C.check_precision("fp16", "cpu")
    monkeypatch.setattr(C, "bf16_supported", lambda: True)
    assert C.check_precision("bf16", "cpu") == "bf16"
    from ettin.eval import EvalOptions

    monkeypatch.setattr(C, "bf16_supported", lambda: False)
    with pytest.raises(EttinError, match="--precision bf16"):
        EvalOptions(precision="bf16").validate()  # before any model is loaded


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("strategy", ["packed", "padded"])
def test_bf16_embeddings_match_fp32(bf16_cpu, causal, strategy):
    torch.manual_seed(0)
    cfg = preset("tiny", causal=causal, **small_vocab_specials(512))
    m = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 300, (24,), generator=g)]
    pooling = "last" if causal else "mean"
    ref = pooled(m, seqs, pad_id=cfg.pad_id, pooling=pooling, strategy=strategy, token_budget=2048)
    with C.precision_context("bf16", "cpu"):
        got = pooled(m, seqs, pad_id=cfg.pad_id, pooling=pooling, strategy=strategy, token_budget=2048)
    assert got.dtype == torch.float32
    assert not torch.equal(got, ref)  # bf16 did run
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() >= 0.999, cos.min().item()


def test_embed_cli_precision(bf16_cpu, tmp_path):
    from ettin.eval.testing import tiny_checkpoint, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    ck = tiny_checkpoint(tmp_path / "enc", "encoder", tok, size="tiny")
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat on the mat\na dog ran in the park\n" * 5)
    outs = {}
    for prec in ("fp32", "bf16"):
        r = CliRunner().invoke(app, ["embed", str(ck), "--input", str(texts), "--out", str(tmp_path / f"{prec}.npy"), "--precision", prec])
        assert r.exit_code == 0, r.output
        outs[prec] = np.load(tmp_path / f"{prec}.npy")
    a, b = outs["fp32"], outs["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert a.dtype == b.dtype == np.float32 and cos.min() >= 0.999 and not np.array_equal(a, b)
    r = CliRunner().invoke(app, ["embed", str(ck), "--input", str(texts), "--out", str(tmp_path / "x.npy"), "--precision", "fp8"])
    assert isinstance(r.exception, EttinError) and "--precision fp8" in str(r.exception)
    assert not (tmp_path / "x.npy").exists()


def test_bf16_mc_accuracy_unchanged(bf16_cpu, tmp_path, shared_data):
    """Multiple choice on real validation items: the same accuracy in bf16 as in fp32
    (decoder: arc_easy + piqa, 100 items each; encoder, masked scoring: arc_easy, 20 items)."""
    from pathlib import Path

    from ettin.eval import evaluate
    from ettin.eval.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    for kind, tasks, limit in (("decoder", ("arc_easy", "piqa"), 100), ("encoder", ("arc_easy",), 20)):
        model = tiny_model(kind, tok, size="tiny", seed=3)
        res = {p: evaluate(model, ",".join(tasks), Path(shared_data), tokenizer=tok, limit=limit, precision=p, batch_size=32)
               for p in ("fp32", "bf16")}
        for task in tasks:
            assert res["bf16"][task]["acc"] == res["fp32"][task]["acc"], (kind, task, res)
