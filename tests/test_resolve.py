"""ettin.resolve: one resolver for every model argument; Hub ids through a mocked download
(nothing here reaches the network); hints for the wrong kind of directory."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.errors import EttinError
from ettin.eval.testing import tiny_checkpoint
from ettin.resolve import hub_id, resolve_model, single_model


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tok_dir):
    from ettin.convert.hf import export_checkpoint

    root = tmp_path_factory.mktemp("models")
    for kind in ("encoder", "decoder"):
        for step in (3, 1):
            tiny_checkpoint(root / "pair" / kind / "checkpoints" / str(step), kind, tok_dir, seed=step, step=step)
    export_checkpoint(root / "pair" / "encoder" / "checkpoints" / "3", root / "hf-enc")
    return root


def test_kinds(tree):
    assert resolve_model(tree / "pair" / "encoder" / "checkpoints" / "1").kind == "checkpoint"
    run = resolve_model(tree / "pair" / "encoder")
    assert run.kind == "run" and [c.name for c in run.checkpoints] == ["1", "3"]
    pair = resolve_model(tree / "pair")
    assert pair.kind == "pair" and [r.name for r in pair.runs] == ["encoder", "decoder"] and len(pair.checkpoints) == 4
    assert resolve_model(tree).kind == "runs"
    assert resolve_model(tree / "hf-enc").kind == "hf"
    assert single_model(tree / "pair" / "decoder", "export").path == tree / "pair" / "decoder" / "checkpoints" / "3"


def test_hints_for_the_wrong_kind_of_directory(tree, tok_dir):
    with pytest.raises(EttinError, match=f"ettin export takes one model: use {tree / 'pair' / 'encoder'} or {tree / 'pair' / 'decoder'}"):
        single_model(tree / "pair", "export")
    with pytest.raises(EttinError, match="run's checkpoints folder; give the run"):
        resolve_model(tree / "pair" / "encoder" / "checkpoints")
    with pytest.raises(EttinError, match="a tokenizer directory, not a model"):
        resolve_model(tok_dir)
    r = CliRunner().invoke(app, ["embed", str(tree / "pair"), "--input", str(tok_dir / "tokenizer.json"), "--out", "x.npy"])
    assert r.exit_code != 0 and "use" in str(r.exception) and "encoder" in str(r.exception)
    r = CliRunner().invoke(app, ["import", str(tree / "pair" / "encoder"), "--out", str(tree / "never")])
    assert "already an ettin run directory" in str(r.exception) and not (tree / "never").exists()


def test_hub_id_syntax(tmp_path, monkeypatch):
    assert hub_id("jhu-clsp/ettin-encoder-150m") == ("jhu-clsp/ettin-encoder-150m", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_hub in ("runs", "a/b/c", "./a/b", "/abs/x", "../x/y", "recipes/x.yaml"):
        assert hub_id(not_hub) is None, not_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None  # a local path wins


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: records calls, serves a local directory."""

    def __init__(self, snapshot):
        self.snapshot, self.calls = snapshot, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False, **kw):
        self.calls.append({"repo_id": repo_id, "revision": revision, "local_files_only": local_files_only, "allow": allow_patterns})
        if local_files_only and self.snapshot is None:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        return str(self.snapshot)


@pytest.fixture
def fake_hub(tree, monkeypatch, tmp_path):
    import huggingface_hub

    snap = tmp_path / "hub-cache" / "snapshots" / "abc123"
    shutil.copytree(tree / "hf-enc", snap)
    fake = FakeHub(snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_hub_id_for_import_eval_export_embed_convert(fake_hub, tree, tmp_path, data, monkeypatch):
    import numpy as np

    from ettin.checkpoint import read_meta
    from ettin.convert.objective import resolve_source
    from ettin.eval import load_for_eval

    r = CliRunner().invoke(app, ["import", "jhu-clsp/ettin-encoder-150m", "--out", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    assert read_meta(tmp_path / "ck")["meta"]["imported_from"] == "jhu-clsp/ettin-encoder-150m"
    call = fake_hub.calls[0]
    assert call["repo_id"] == "jhu-clsp/ettin-encoder-150m" and call["revision"] is None and call["local_files_only"] is False
    assert "*.safetensors" in call["allow"] and "*.json" in call["allow"]

    [em] = load_for_eval("jhu-clsp/ettin-encoder-150m@main")
    assert em.name == "jhu-clsp/ettin-encoder-150m@main" and em.kind == "encoder"
    assert fake_hub.calls[-1]["revision"] == "main"

    r = CliRunner().invoke(app, ["export", "org/enc", "--out", str(tmp_path / "hf-again")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "hf-again" / "config.json").read_text())["ettin"]["model"]
    b = json.loads((tree / "hf-enc" / "config.json").read_text())["ettin"]["model"]
    assert {k: v for k, v in a.items() if k != "origin"} == {k: v for k, v in b.items() if k != "origin"}

    texts = tmp_path / "t.txt"
    texts.write_text("hello world\nsecond line\n")
    r = CliRunner().invoke(app, ["embed", "org/enc", "--input", str(texts), "--out", str(tmp_path / "e.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "e.npy").shape[0] == 2

    src = resolve_source("org/enc", tmp_path / "conv")
    assert src == tmp_path / "conv" / "source" and (src / "ettin.json").is_file()


def test_hub_offline_uses_the_cache_only(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/enc").kind == "hf"
    assert fake_hub.calls[-1]["local_files_only"] is True
    fake_hub.snapshot = None  # not cached
    with pytest.raises(EttinError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model("org/enc")


def test_hub_errors_are_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, **kw):
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(err, "404 Client Error.\nRepository Not Found for url: https://huggingface.co/api/models/x/y")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(EttinError, match="no such local directory, and no such model on the Hugging Face Hub") as e:
        resolve_model("nobody/nothing")
    assert "\n" not in str(e.value)
