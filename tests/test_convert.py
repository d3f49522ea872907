"""Cross-objective continued training (encoder-from-decoder with MNTP, decoder-from-encoder with CLM)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_recipe
from ettin import checkpoint as ckpt
from ettin.cli import app
from ettin.convert.objective import convert
from ettin.errors import EttinError
from ettin.train.trainer import RunDir, last_checkpoint, train


@pytest.fixture(scope="module")
def pair_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    recipe = write_recipe(root / "r.yaml", tiny_data, **{"train.tokens": 6 * 8 * 32, "checkpoint.every_tokens": 10**9})
    train(recipe, root / "pair", pair=True, progress=False)
    return root / "pair"


def cross_recipe(tmp_path, tiny_data):
    return write_recipe(
        tmp_path / "x.yaml",
        tiny_data,
        **{"name": "cross-objective", "train.tokens": 4 * 8 * 32, "train.mask_rate": 0.15, "train.seed": 210, "optim.schedule": {"kind": "trapezoid", "warmup_tokens": 256, "decay_tokens": 256, "end_factor": 0.0}},
    )


def sensitivity(model, L=24, i=10):
    """Max change of the output at position i when tokens after i change."""
    torch.manual_seed(0)
    x = torch.randint(5, 400, (1, L))
    y = x.clone()
    y[0, i + 1 :] = torch.randint(5, 400, (L - i - 1,))
    model.eval()
    with torch.no_grad():
        return (model(x)[0, i] - model(y)[0, i]).abs().max().item()


def test_encoder_from_decoder_mntp(pair_run, tiny_data, tmp_path):
    res = convert(pair_run / "decoder", "mntp", cross_recipe(tmp_path, tiny_data), tmp_path / "efd", progress=False)
    assert res["finished"]
    path = last_checkpoint(tmp_path / "efd")
    cfg = ckpt.load_config(path)
    assert not cfg.causal and cfg.objective == "mntp" and "decoder (clm) -> mntp" in cfg.origin
    assert sensitivity(ckpt.load_model(path)) > 1e-6  # bidirectional now
    m = [json.loads(x) for x in (tmp_path / "efd" / "metrics.jsonl").read_text().splitlines()]
    assert {r["objective"] for r in m} == {"mntp"} and m[0]["lr"] == 0.0  # fresh schedule: warmup from 0
    # weights only: the converted run starts from the decoder's weights, not from a random init
    src = ckpt.load_state_dict(last_checkpoint(pair_run / "decoder"))
    state0 = json.loads((path / "trainer" / "state.json").read_text())
    assert state0["stage"] == "cross-objective"
    assert src["embed.weight"].shape == ckpt.load_state_dict(path)["embed.weight"].shape
    # the export says the MLM head is shifted
    from ettin.convert.hf import export_checkpoint

    export_checkpoint(path, tmp_path / "hf")
    assert "shifted" in (tmp_path / "hf" / "README.md").read_text().lower()


def test_decoder_from_encoder_clm_via_hf_import(pair_run, tiny_data, tmp_path):
    from ettin.convert.hf import export_checkpoint

    export_checkpoint(last_checkpoint(pair_run / "encoder"), tmp_path / "hf-enc")
    res = convert(tmp_path / "hf-enc", "clm", cross_recipe(tmp_path, tiny_data), tmp_path / "dfe", progress=False)
    assert res["finished"]
    path = last_checkpoint(tmp_path / "dfe")
    cfg = ckpt.load_config(path)
    assert cfg.causal and cfg.objective == "clm" and "encoder (mlm) -> clm" in cfg.origin
    assert sensitivity(ckpt.load_model(path)) == 0.0  # causal now
    assert ckpt.is_checkpoint(tmp_path / "dfe" / "source")  # the imported HF model


def test_bad_input(pair_run, tiny_data, tmp_path):
    recipe = cross_recipe(tmp_path, tiny_data)
    with pytest.raises(EttinError, match="already trained with clm.*--force"):
        convert(pair_run / "decoder", "clm", recipe, tmp_path / "a", progress=False)
    assert not RunDir(tmp_path / "a").list_checkpoints()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "junk"), "--objective", "mntp", "--recipe", str(recipe), "--out", str(tmp_path / "b")])
    assert r.exit_code != 0
    nodata = tmp_path / "nodata.yaml"
    nodata.write_text("train: {tokens: 100}\n")
    with pytest.raises(EttinError, match="data.sources' is empty"):
        convert(pair_run / "encoder", "clm", nodata, tmp_path / "c", progress=False)
    res = convert(pair_run / "decoder", "clm", recipe, tmp_path / "d", force=True, max_steps=1, progress=False)
    assert res["steps"] == 1
