"""Attention-output dropout: training mode only, exported and imported faithfully, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_recipe
from ettin.checkpoint import load_config, load_model, save_checkpoint
from ettin.config import preset, small_vocab_specials
from ettin.convert import hf as H
from ettin.errors import EttinError
from ettin.model import Transformer
from ettin.train.trainer import train

V = 128


def model(p: float, causal: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("micro", causal=causal, attn_out_dropout=p, **small_vocab_specials(V)))


def test_dropout_acts_in_training_mode_only():
    ids = torch.randint(4, V, (2, 40), generator=torch.Generator().manual_seed(0))
    m0, m1 = model(0.0), model(0.1)
    m1.load_state_dict(m0.state_dict())
    with torch.no_grad():
        ref = m0.eval()(ids)
        assert torch.equal(m1.eval()(ids), ref)  # eval: no dropout at all
        m0.train(), m1.train()
        assert torch.equal(m0(ids), ref)  # p = 0 in training draws nothing
        torch.manual_seed(5)
        a = m1(ids)
        torch.manual_seed(5)
        b = m1(ids)
    assert torch.equal(a, b) and not torch.equal(a, ref)  # seeded masks, and they act
    with torch.no_grad():
        assert not torch.equal(m1(ids), a)  # a new draw gives new masks


def test_dropout_is_one_config_field_validated():
    with pytest.raises(EttinError, match="attn_out_dropout"):
        preset("micro", attn_out_dropout=1.0, **small_vocab_specials(V))
    m = model(0.0)
    m.set_attn_out_dropout(0.1)
    assert m.config.attn_out_dropout == 0.1 and all(b.out_dropout == 0.1 for b in m.blocks)
    # only the attention output has dropout: no nn.Dropout modules anywhere
    assert not any(isinstance(x, torch.nn.Dropout) for x in m.modules())


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_export_keeps_transformers_logits_and_imports_the_dropout(tmp_path, causal):
    transformers = pytest.importorskip("transformers")
    m = model(0.1, causal=causal)
    ckpt = save_checkpoint(tmp_path / "ckpt", m)
    assert load_model(ckpt).training is False  # loaded for inference
    out = H.export_checkpoint(ckpt, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    # transformers' attention_dropout would also drop attention probabilities: exports carry 0
    assert (cfg["attention_dropout"], cfg["embedding_dropout"], cfg["mlp_dropout"]) == (0.0, 0.0, 0.0)
    assert cfg["ettin"]["model"]["attn_out_dropout"] == 0.1
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    theirs = cls.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(4, V, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (m.eval()(ids) - theirs(input_ids=ids).logits).abs().max().item() <= 1e-4
    mem = H.load_hf_as_model(out)
    assert mem.training is False and mem.config.attn_out_dropout == 0.1  # in-memory imports too
    back = H.import_hf(out, tmp_path / "back")
    assert load_config(back).attn_out_dropout == 0.1


def test_plain_transformers_config_maps_attention_dropout(capsys):
    m = model(0.0)
    d = H.hf_config_dict(m.config)
    d.pop("ettin")
    d["attention_dropout"] = 0.1
    assert H.config_from_hf(d).attn_out_dropout == 0.1
    d["attention_dropout"] = 2
    with pytest.raises(EttinError, match="attention_dropout"):
        H.config_from_hf(d)


def test_recipe_sets_dropout_and_pair_side_draws_its_own_masks(tiny_data, tmp_path):
    """The recipe's value reaches the model; an encoder trained alone or in a pair is identical."""
    over = {"train.tokens": 4 * 8 * 32, "model.attn_out_dropout": 0.1, "checkpoint.every_tokens": 10**9}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **over)
    plain = write_recipe(tmp_path / "p.yaml", tiny_data, **{**over, "model.attn_out_dropout": 0.0})
    train(recipe, tmp_path / "solo", progress=False)
    train(recipe, tmp_path / "pair", pair=True, progress=False)
    train(plain, tmp_path / "plain", progress=False)

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "solo") == losses(tmp_path / "pair" / "encoder")
    assert losses(tmp_path / "solo") != losses(tmp_path / "plain")  # the dropout acts
    assert load_model(tmp_path / "solo" / "checkpoints" / "00000004").config.attn_out_dropout == 0.1
