"""``ettin embed``: embeddings of many texts equal the model's own pooled hidden states, in order."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ettin.cli import app
from ettin.errors import EttinError
from ettin.eval.testing import tiny_checkpoint

TEXTS = ["the cat sat on the mat", "a dog", "the quick brown fox jumps over the lazy dog " * 6, "x", "on the mat the cat sat"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def error(r) -> str:
    """The one-line message the ``ettin`` entry point prints for an EttinError."""
    assert isinstance(r.exception, EttinError), (r.output, r.exception)
    return str(r.exception)


def reference(ckpt, texts, pooling, max_length=512):
    """One text at a time, no padding, no packing: the plain computation."""
    from ettin.checkpoint import load_model
    from ettin.eval.loading import load_tokenizer_file

    model = load_model(ckpt).eval()
    tok = load_tokenizer_file(ckpt / "tokenizer")
    out = []
    for t in texts:
        ids = [model.config.cls_id, *tok.encode(t, add_special_tokens=False).ids[: max_length - 2], model.config.sep_id]
        with torch.no_grad():
            h = model.encode(torch.tensor([ids]))[0]
        out.append({"mean": h.mean(0), "cls": h[0], "last": h[-1]}[pooling])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("kind,pooling", [("encoder", "mean"), ("encoder", "cls"), ("decoder", "last")])
@pytest.mark.parametrize("strategy", ["packed", "padded"])
def test_embed_equals_one_text_at_a_time(tok_dir, tmp_path, kind, pooling, strategy):
    ckpt = tiny_checkpoint(tmp_path / kind, kind, tok_dir)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "emb.npy"
    args = ["embed", ckpt, "--input", inp, "--out", out, "--strategy", strategy, "--max-length", 40]
    if pooling != ("last" if kind == "decoder" else "mean"):
        args += ["--pooling", pooling]  # otherwise the default for the side
    r = cli(*args)
    assert r.exit_code == 0, r.output
    got = np.load(out)
    want = reference(ckpt, TEXTS, pooling, max_length=40)
    assert got.shape == (len(TEXTS), ckpt_hidden(ckpt)) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5


def ckpt_hidden(ckpt):
    from ettin.checkpoint import load_config

    return load_config(ckpt).hidden


def test_embed_text_lines_normalized_and_run_dirs(tok_dir, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "00000004", "encoder", tok_dir, step=4)
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "e.npy"
    r = cli("embed", tmp_path / "run", "--input", inp, "--out", out, "--normalize")  # a run directory: its last checkpoint
    assert r.exit_code == 0, r.output
    got = np.load(out)
    want = reference(ckpt, TEXTS, "mean")
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    assert np.abs(got - want).max() < 1e-5


def test_embed_bad_input_one_line_and_nothing_written(tok_dir, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c", "encoder", tok_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    out = tmp_path / "e.npy"
    r = cli("embed", ckpt, "--input", bad, "--out", out)
    assert error(r).startswith(f"{bad}:2: not valid JSON")
    bad.write_text(json.dumps({"body": "no text key"}) + "\n")
    r = cli("embed", ckpt, "--input", bad, "--out", out)
    assert error(r) == f"{bad}:1: expected an object with a string 'text'"
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    r = cli("embed", ckpt, "--input", good, "--out", tmp_path / "e.csv")
    assert error(r) == f"{tmp_path / 'e.csv'}: the output must be a .npy file"
    r = cli("embed", ckpt, "--input", tmp_path / "missing.txt", "--out", out)
    assert error(r) == f"{tmp_path / 'missing.txt'}: no such input file"
    assert not out.exists() and not list(tmp_path.glob(".e.npy*"))
