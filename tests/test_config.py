import json

import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.config import PAPER_PARAMS, PAPER_SIZES, ModelConfig, preset, small_vocab_specials
from ettin.errors import EttinError
from ettin.model import Transformer


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_paper_param_counts_exact(name):
    assert preset(name).num_params() == PAPER_PARAMS[name]


def test_num_params_matches_module_on_meta():
    import torch

    for name in ("17m", "150m", "1b"):
        with torch.device("meta"):
            m = Transformer(preset(name), init=False)
        assert m.num_params() == PAPER_PARAMS[name]


def test_sizes_json_cli():
    r = CliRunner().invoke(app, ["sizes", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    for name in PAPER_SIZES:
        assert rows[name]["params"] == PAPER_PARAMS[name]
    assert rows["150m"]["layers"] == 22 and rows["150m"]["hidden"] == 768
    assert rows["150m"]["intermediate"] == 1152 and rows["150m"]["heads"] == 12
    assert rows["1b"]["vocab_size"] == 50368


def test_unknown_size_lists_valid():
    with pytest.raises(EttinError, match="valid sizes are 17m, 32m"):
        preset("15m")


def test_windows_match_transformers_semantics():
    enc = preset("tiny", **small_vocab_specials(128))
    dec = preset("tiny", causal=True, **small_vocab_specials(128))
    assert enc.window() == (64, 64)
    assert dec.window() == (63, 0)
    assert enc.replace(window_left=64, window_right=0).window() == (64, 0)


def test_config_roundtrip_and_errors():
    cfg = preset("micro", causal=True, **small_vocab_specials(128))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.objective == "clm" and cfg.kind == "decoder"
    bad = cfg.to_dict() | {"hiden": 3}
    with pytest.raises(EttinError, match="did you mean 'hidden'"):
        ModelConfig.from_dict(bad)
    with pytest.raises(EttinError, match="mask_id"):
        preset("micro", vocab_size=64, cls_id=0, sep_id=1, pad_id=2, mask_id=99)
    with pytest.raises(EttinError, match="needs causal"):
        preset("micro", causal=True, objective="mlm", **small_vocab_specials(64))


def test_init_cli_unknown_size_one_line(tmp_path):
    r = CliRunner().invoke(app, ["init", "--size", "nope", "--kind", "encoder", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0
    assert not (tmp_path / "x").exists()
