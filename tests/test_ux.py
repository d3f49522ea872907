"""Small promises to users: file modes follow the umask, no false vocabulary alarm, honest
warnings (TensorBoard, non-cross-objective convert), stage names in --set errors, .gitignore."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from ettin.errors import EttinError


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_weights_get_the_same_mode_as_other_files(tmp_path, tok_dir, umask):
    from ettin.convert.hf import export_checkpoint
    from ettin.eval.testing import tiny_checkpoint

    old = os.umask(umask)
    try:
        ck = tiny_checkpoint(tmp_path / "ck", "encoder", tok_dir)
        export_checkpoint(ck, tmp_path / "hf")
    finally:
        os.umask(old)
    for root in (tmp_path / "ck", tmp_path / "hf"):
        modes = {k: v for k, v in _modes(root).items() if not k.startswith("tokenizer/")}  # copies keep their source's mode
        assert "model.safetensors" in modes and len(modes) >= 2
        assert set(modes.values()) == {0o666 & ~umask}, modes


def _tokenizer_json(tok_dir: Path) -> dict:
    return json.loads((tok_dir / "tokenizer.json").read_text())


def test_no_false_vocabulary_alarm_on_our_own_exports(tmp_path, tiny_data, capsys):
    """The demo-style tokenizer (vocabulary exactly the model's, specials repeated as added tokens)
    used to warn 'tokenizer has about N tokens but the model only M' on every import and eval."""
    from ettin.checkpoint import save_checkpoint
    from ettin.config import preset
    from ettin.convert.hf import import_hf, export_checkpoint, load_hf, max_token_id
    from ettin.data.tokenizer import model_overrides
    from ettin.model import Transformer

    tok = tiny_data / "tokenizer"
    cfg = preset("micro", causal=False, **model_overrides(tok))
    tj = _tokenizer_json(tok)
    old_count = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    assert old_count > cfg.vocab_size  # what the old check counted: it would have warned here
    assert max_token_id(tj) < cfg.vocab_size
    save_checkpoint(tmp_path / "ck", Transformer(cfg), tokenizer_dir=tok)
    export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    capsys.readouterr()
    _, _, notes = load_hf(tmp_path / "hf")
    assert notes == []
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert "warning" not in capsys.readouterr().err

    # a tokenizer that really produces an id beyond the model still warns
    tj["added_tokens"].append({"id": cfg.vocab_size + 3, "content": "[EXTRA]", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tj))
    _, _, notes = load_hf(tmp_path / "hf")
    assert len(notes) == 1 and f"ids up to {cfg.vocab_size + 3}" in notes[0] and f"has {cfg.vocab_size}" in notes[0]


def test_convert_warns_when_not_cross_objective(tmp_path, tok_dir, tiny_data, capsys, monkeypatch):
    import ettin.train.trainer as trainer
    from ettin.convert.objective import convert
    from ettin.eval.testing import tiny_checkpoint

    monkeypatch.setattr(trainer, "train", lambda *a, **k: {"kind": k.get("kind")})  # the warning comes before training
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data)
    enc = tiny_checkpoint(tmp_path / "enc", "encoder", tok_dir)
    dec = tiny_checkpoint(tmp_path / "dec", "decoder", tok_dir)
    assert convert(enc, "mntp", recipe, tmp_path / "o1")["kind"] == "encoder"
    err = capsys.readouterr().err
    assert "is an encoder; --objective mntp continues it as an encoder, which is not a cross-objective conversion" in err
    convert(dec, "mntp", recipe, tmp_path / "o2")  # the real conversion: silent
    convert(enc, "clm", recipe, tmp_path / "o3")
    assert capsys.readouterr().err == ""
    convert(dec, "clm", recipe, tmp_path / "o4", force=True)
    assert "is a decoder; --objective clm continues it as a decoder" in capsys.readouterr().err


def test_tensorboard_requested_but_missing_warns_once(tmp_path, tiny_data, capsys, monkeypatch):
    import ettin.train.trainer as trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(trainer, "_WARNED", set())
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"logging.tensorboard": True})
    trainer.train(recipe, tmp_path / "pair", pair=True, max_steps=1, progress=False)
    err = capsys.readouterr().err
    assert err.count("logging.tensorboard is true but TensorBoard logs cannot be written") == 1, err
    assert not (tmp_path / "pair" / "encoder" / "tb").exists()


def test_tensorboard_is_off_unless_asked():
    from ettin.train.recipe import LoggingSection

    assert LoggingSection().tensorboard is False


def test_set_with_an_unknown_stage_lists_the_stages(tmp_path, tiny_data):
    from ettin.train.recipe import load_recipe

    one = write_recipe(tmp_path / "s1.yaml", tiny_data, name="warm")
    two = write_recipe(tmp_path / "s2.yaml", tiny_data, name="decay")
    (tmp_path / "all.yaml").write_text("stages: [s1.yaml, s2.yaml]\n")
    assert one and two
    with pytest.raises(EttinError, match=r"'deacy' is neither a recipe section .* \(stages: warm, decay\); did you mean 'decay'\?"):
        load_recipe(tmp_path / "all.yaml", ["deacy.train.tokens=5"])
    assert load_recipe(tmp_path / "all.yaml", ["decay.train.tokens=4096"])[1].train.tokens == 4096


def test_gitignore_covers_the_demo_default_output():
    import typer.main

    from ettin.cli import app

    demo = typer.main.get_command(app).commands["demo"]
    default = next(p.default for p in demo.params if p.name == "out")
    lines = (Path(__file__).parent.parent / ".gitignore").read_text().split()
    assert f"/{Path(default).name}/" in lines


def test_resolved_recipe_says_what_it_does_not_claim_and_still_loads(tmp_path, tiny_data):
    from ettin.train.recipe import load_recipe, stages_to_yaml

    stages = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_data))
    text = stages_to_yaml(stages)
    assert text.startswith("# Resolved recipe") and "distributed.* applies only under torchrun" in text
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_recipe(tmp_path / "resolved.yaml") == stages
