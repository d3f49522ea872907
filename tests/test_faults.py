"""Fault injection: bad input to every command, kills, disk full, concurrency, path escape,
pathological text and the NaN guard. Each failure must be one line, leave nothing behind and
never remove what was already there.

Adding a bad-input case: append a ``Case`` to ``CASES`` (argv built from the shared ``World``;
``words`` must appear in the single ``error:`` line; ``out`` names a path that must not exist
afterwards; ``keep`` names a file whose bytes must be unchanged).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file, save_file

from ettin import cli
from ettin.errors import EttinError
from ettin.train.trainer import RunDir, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("ETTIN_FAULT", None)
STEP_TOKENS = 8 * 32  # global_batch x seq_len of conftest.write_recipe


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real entry point in-process: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["ettin", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def tiny_recipe(path: Path, data_dir: Path, steps: int = 4, every: int = 1, **over) -> Path:
    over = {"train.tokens": steps * STEP_TOKENS, "checkpoint.every_tokens": every * STEP_TOKENS,
            "optim.schedule.warmup_tokens": 0, **over}
    return write_recipe(path, data_dir, **over)


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- the shared world of inputs ---------------------------------------------------------------
@dataclass
class World:
    root: Path
    data: Path  # prepared data
    tok: Path
    ckpt: Path  # a micro encoder checkpoint with tokenizer
    nan_ckpt: Path
    hf: Path  # its Hugging Face export
    run: Path  # a finished 2-step run
    recipe: Path
    evaldata: Path
    precious: Path  # a foreign non-empty directory
    notes: Path  # precious/notes.txt
    a_file: Path
    texts: Path  # a small JSONL corpus
    extra: dict = field(default_factory=dict)

    def p(self, name: str) -> Path:
        return self.root / name


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8", errors="surrogatepass")
    return path


def _copy_data_with_manifest(w: World, name: str, edit) -> Path:
    d = w.root / name
    shutil.copytree(w.data, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(d, m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _bad_token_data(w: World) -> Path:
    """A data directory whose manifest is self-consistent (hashes recomputed) but holds id >= vocab."""
    from ettin.data.shards import fingerprint
    from ettin.fsutil import sha256_file

    if w.p("data-badid").exists():
        return w.p("data-badid")

    def edit(d, m):
        sh = m["shards"][0]
        f = d / sh["tokens_file"]
        arr = np.fromfile(f, dtype="<u2")
        arr[1::5] = m["tokenizer"]["vocab_size"] + 3  # in every batch
        arr.tofile(f)
        sh["tokens_sha256"] = sha256_file(f)
        m["fingerprint"] = fingerprint(m)

    return _copy_data_with_manifest(w, "data-badid", edit)


def _nan_copy(src: Path, dst: Path, value: float = float("nan")) -> Path:
    """A copy of the model directory ``src`` whose first weight holds ``value`` (NaN or Inf)."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    st = load_file(str(f))
    k = sorted(st)[0]
    st[k] = st[k].clone()
    st[k].view(-1)[0] = value
    save_file(st, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_data, data) -> World:
    from ettin.checkpoint import save_checkpoint
    from ettin.config import preset
    from ettin.convert.hf import export_checkpoint
    from ettin.data.tokenizer import model_overrides
    from ettin.model import Transformer

    root = tmp_path_factory.mktemp("faults")
    tok = tiny_data / "tokenizer"
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", Transformer(preset("micro", **model_overrides(tok))), meta={"step": 0}, tokenizer_dir=tok)
    nan_ckpt = _nan_copy(ckpt, root / "nan-ckpt")
    hf = export_checkpoint(ckpt, root / "hf")
    recipe = tiny_recipe(root / "recipe.yaml", tiny_data, steps=2)
    run = root / "run"
    train(recipe, run, progress=False)
    precious = root / "precious"
    precious.mkdir()
    notes = precious / "notes.txt"
    notes.write_text("keep me")
    a_file = root / "a_file"
    a_file.write_text("a plain file")
    texts = _write_jsonl(root / "texts.jsonl", [json.dumps({"text": f"hello world number {i}"}) for i in range(20)])
    return World(root=root, data=tiny_data, tok=tok, ckpt=ckpt, nan_ckpt=nan_ckpt, hf=hf, run=run, recipe=recipe, evaldata=data,
                 precious=precious, notes=notes, a_file=a_file, texts=texts)


# -- builders for inputs that need a file of their own -------------------------------------------
def deep_json(w: World) -> Path:
    return _write_jsonl(w.p("deep.jsonl"), [json.dumps({"text": "ok"}), '{"text": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"])


def surrogate_json(w: World) -> Path:
    return _write_jsonl(w.p("surrogate.jsonl"), [json.dumps({"text": "fine"}), '{"text": "bad \\ud800 here"}'])


def bad_line_json(w: World) -> Path:
    return _write_jsonl(w.p("badline.jsonl"), [json.dumps({"text": "fine"}), '{"text": "unterminated'])


def hf_with(w: World, name: str, **changes) -> Path:
    d = w.p(name)
    if not d.exists():
        shutil.copytree(w.hf, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        cfg.pop("ettin", None)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def hf_nan(w: World) -> Path:
    d = w.p("hf-nan")
    if not d.exists():
        _nan_copy(w.hf, d, float("inf"))
    return d


def ckpt_with(w: World, name: str, **changes) -> Path:
    d = w.p(name)
    if not d.exists():
        shutil.copytree(w.ckpt, d)
        doc = json.loads((d / "ettin.json").read_text())
        doc["model"].update(changes)
        (d / "ettin.json").write_text(json.dumps(doc))
    return d


def tok_with(w: World, name: str, tokenizer_json: str | None = None, **meta) -> Path:
    """A copy of the tokenizer directory with tokenizer.json replaced or ettin.json fields changed."""
    d = w.p(name)
    if not d.exists():
        shutil.copytree(w.tok, d)
        if tokenizer_json is not None:
            (d / "tokenizer.json").write_text(tokenizer_json)
        if meta:
            f = d / "ettin_tokenizer.json"
            doc = json.loads(f.read_text())
            doc.update(meta)
            f.write_text(json.dumps(doc))
    return d


DEEP = "[" * 100_000 + "]" * 100_000


def deep_file(w: World, name: str, src: Path, fname: str) -> Path:
    """A copy of ``src`` whose ``fname`` is JSON/YAML nested 100,000 levels deep."""
    d = w.p(name)
    if not d.exists():
        if src.is_dir():
            shutil.copytree(src, d)
        else:
            d.mkdir()
        (d / fname).write_text('{"a": ' + DEEP + "}")
    return d


def stages_recipe(w: World) -> Path:
    p = w.p("stages-str.yaml")
    p.write_text(yaml.safe_dump({"stages": "abc"}))
    return p


def tok_symlink_out(w: World) -> Path:
    d = w.p("tok-link")
    if not d.exists():
        shutil.copytree(w.tok, d)
        (d / "secret.txt").symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")
    return d


def manifest_escape(kind: str):
    def build(w: World) -> Path:
        name = f"data-{kind}"
        if w.p(name).exists():
            return w.p(name)

        def edit(d, m):
            sh = m["shards"][0]
            if kind == "dotdot":
                sh["tokens_file"] = "../../" + sh["tokens_file"]
            elif kind == "absolute":
                sh["tokens_file"] = str(w.data / sh["tokens_file"])
            elif kind == "symlink":
                (d / "link.bin").symlink_to(w.data / sh["tokens_file"])
                sh["tokens_file"] = "link.bin"
            elif kind == "notalist":
                m["shards"] = "tokens-00000.bin"

        return _copy_data_with_manifest(w, name, edit)

    return build


def report_files_foreign(w: World) -> Path:
    d = w.p("rep_files")
    d.mkdir(exist_ok=True)
    (d / "mine.txt").write_text("not a plot")
    return w.p("rep.html")


def foreign_html(w: World) -> Path:
    p = w.p("foreign.html")
    p.write_text("<html>my own page</html>")
    return p


# -- the table --------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: Callable[[World], list]
    words: str
    code: int = 1
    out: Callable[[World], Path] | None = None  # must not exist afterwards
    keep: Callable[[World], Path] | None = None  # must keep its bytes


def _o(name):
    return lambda w: w.p(name)


T = ["--set"]
CASES = [
    # sizes / usage errors
    Case("sizes-bad-flag", lambda w: ["sizes", "--bogus"], "No such option", code=2),
    Case("init-bad-int", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", w.p("i0"), "--seed", "abc"], "--seed", code=2, out=_o("i0")),
    # init
    Case("init-size", lambda w: ["init", "--size", "huge", "--kind", "encoder", "--out", w.p("i1")], "unknown size", out=_o("i1")),
    Case("init-kind", lambda w: ["init", "--size", "micro", "--kind", "both", "--out", w.p("i2")], "--kind", out=_o("i2")),
    Case("init-vocab-0", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--vocab-size", "0", "--out", w.p("i3")], "--vocab-size", out=_o("i3")),
    Case("init-vocab-huge", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--vocab-size", "1000000000", "--out", w.p("i4")], "--vocab-size", out=_o("i4")),
    Case("init-seed-neg", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--seed", "-1", "--out", w.p("i5")], "--seed", out=_o("i5")),
    Case("init-foreign-out", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", w.precious], "--force", keep=lambda w: w.notes),
    Case("init-out-file", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", w.a_file, "--force"], "is a file", keep=lambda w: w.a_file),
    Case("init-out-under-file", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", w.a_file / "sub"], "is a file, not a directory", keep=lambda w: w.a_file),
    Case("init-run-dir", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", w.run, "--force"], "training run", keep=lambda w: w.run / "metrics.jsonl"),
    Case("init-run-ckpt", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", RunDir(w.run).list_checkpoints()[-1][1], "--force"], "training run",
         keep=lambda w: RunDir(w.run).list_checkpoints()[-1][1] / "model.safetensors"),
    Case("init-tok-missing", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--tokenizer", w.p("nope"), "--out", w.p("i6")], "not found", out=_o("i6")),
    Case("init-tok-symlink-out", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--tokenizer", tok_symlink_out(w), "--out", w.p("i7")], "symbolic link", out=_o("i7")),
    # tokenizer
    Case("tok-vocab-small", lambda w: ["tokenizer", "train", w.texts, "--vocab-size", "10", "--out", w.p("t1")], "--vocab-size", out=_o("t1")),
    Case("tok-minfreq-neg", lambda w: ["tokenizer", "train", w.texts, "--vocab-size", "300", "--min-frequency", "-1", "--out", w.p("t2")], "--min-frequency", out=_o("t2")),
    Case("tok-text-unit", lambda w: ["tokenizer", "train", w.texts, "--vocab-size", "300", "--text-unit", "word", "--out", w.p("t3")], "--text-unit", out=_o("t3")),
    Case("tok-foreign-out", lambda w: ["tokenizer", "train", w.texts, "--vocab-size", "300", "--out", w.precious], "--force", keep=lambda w: w.notes),
    Case("tok-input-missing", lambda w: ["tokenizer", "train", w.p("nope.jsonl"), "--vocab-size", "300", "--out", w.p("t4")], "nope.jsonl", out=_o("t4")),
    Case("tok-deep-json", lambda w: ["tokenizer", "train", deep_json(w), "--vocab-size", "300", "--out", w.p("t5")], "nested too deeply", out=_o("t5")),
    Case("tok-surrogate", lambda w: ["tokenizer", "train", surrogate_json(w), "--vocab-size", "300", "--out", w.p("t6"), "-q"], "not valid Unicode", out=_o("t6")),
    Case("tok-info-bad-json", lambda w: ["tokenizer", "info", tok_with(w, "tok-badjson", tokenizer_json="{not json")], "tokenizer.json"),
    Case("tok-info-not-tokenizer", lambda w: ["tokenizer", "info", tok_with(w, "tok-empty", tokenizer_json="{}")], "tokenizer.json"),
    Case("tok-info-bad-meta", lambda w: ["tokenizer", "info", tok_with(w, "tok-badmeta", vocab_size="lots")], "vocab_size"),
    Case("init-tok-bad-meta", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--tokenizer", tok_with(w, "tok-badmeta2", mask_id=10**9), "--out", w.p("i8")], "mask_id", out=_o("i8")),
    Case("init-unwritable", lambda w: ["init", "--size", "micro", "--kind", "encoder", "--out", "/proc/ettin-fault-test"], "cannot write here"),
    Case("tok-info-missing", lambda w: ["tokenizer", "info", w.p("nope")], "not found"),
    Case("tok-info-garbage", lambda w: ["tokenizer", "info", w.precious], "tokenizer.json"),
    # data
    Case("prep-deep-json", lambda w: ["data", "prepare", deep_json(w), "--tokenizer", w.tok, "--out", w.p("d1"), "--workers", "1", "-q"], "nested too deeply", out=_o("d1")),
    Case("prep-surrogate", lambda w: ["data", "prepare", surrogate_json(w), "--tokenizer", w.tok, "--out", w.p("d2"), "--workers", "1", "-q"], "not valid Unicode", out=_o("d2")),
    Case("prep-bad-json", lambda w: ["data", "prepare", bad_line_json(w), "--tokenizer", w.tok, "--out", w.p("d3"), "--workers", "1", "-q"], "badline.jsonl:2", out=_o("d3")),
    Case("prep-shard-tokens", lambda w: ["data", "prepare", w.texts, "--tokenizer", w.tok, "--out", w.p("d4"), "--shard-tokens", "0"], "--shard-tokens", out=_o("d4")),
    Case("prep-workers", lambda w: ["data", "prepare", w.texts, "--tokenizer", w.tok, "--out", w.p("d5"), "--workers", "0"], "--workers", out=_o("d5")),
    Case("prep-run-dir", lambda w: ["data", "prepare", w.texts, "--tokenizer", w.tok, "--out", w.run, "--overwrite"], "training run", keep=lambda w: w.run / "metrics.jsonl"),
    Case("prep-out-under-file", lambda w: ["data", "prepare", w.texts, "--tokenizer", w.tok, "--out", w.a_file / "d"], "is a file", keep=lambda w: w.a_file),
    Case("verify-dotdot", lambda w: ["data", "verify", manifest_escape("dotdot")(w)], "outside"),
    Case("verify-absolute", lambda w: ["data", "verify", manifest_escape("absolute")(w)], "outside"),
    Case("verify-symlink", lambda w: ["data", "verify", manifest_escape("symlink")(w)], "symbolic link out"),
    Case("verify-shards-type", lambda w: ["data", "verify", manifest_escape("notalist")(w)], "'shards' must be a list"),
    Case("verify-token-id", lambda w: ["data", "verify", _bad_token_data(w)], "outside the vocabulary"),
    Case("info-missing", lambda w: ["data", "info", w.p("nope")], "not found"),
    # train / pair: recipe and --set values
    Case("train-tokens-1e30", lambda w: ["train", w.recipe, "--out", w.p("r1"), *T, "train.tokens=1e30"], "train.tokens", out=_o("r1")),
    Case("train-lr-neg", lambda w: ["train", w.recipe, "--out", w.p("r2"), *T, "optim.lr=-1"], "optim.lr", out=_o("r2")),
    Case("train-lr-nan", lambda w: ["train", w.recipe, "--out", w.p("r3"), *T, "optim.lr=nan"], "optim.lr", out=_o("r3")),
    Case("train-betas", lambda w: ["train", w.recipe, "--out", w.p("r4"), *T, "optim.betas=[0.9, 1.5]"], "optim.betas[1]", out=_o("r4")),
    Case("train-eps", lambda w: ["train", w.recipe, "--out", w.p("r5"), *T, "optim.eps=0"], "optim.eps", out=_o("r5")),
    Case("train-wd", lambda w: ["train", w.recipe, "--out", w.p("r6"), *T, "optim.weight_decay=-0.1"], "optim.weight_decay", out=_o("r6")),
    Case("train-clip", lambda w: ["train", w.recipe, "--out", w.p("r7"), *T, "optim.grad_clip=0"], "optim.grad_clip", out=_o("r7")),
    Case("train-seed", lambda w: ["train", w.recipe, "--out", w.p("r8"), *T, "train.seed=-3"], "train.seed", out=_o("r8")),
    Case("train-mask-rate", lambda w: ["train", w.recipe, "--out", w.p("r9"), *T, "train.mask_rate=1.5"], "train.mask_rate", out=_o("r9")),
    Case("train-device", lambda w: ["train", w.recipe, "--out", w.p("r10"), *T, "train.device=tpu"], "train.device", out=_o("r10")),
    Case("train-sources-type", lambda w: ["train", w.recipe, "--out", w.p("r11"), *T, "data.sources=abc"], "data.sources", out=_o("r11")),
    Case("train-source-weight", lambda w: ["train", w.recipe, "--out", w.p("r12"), *T, f"data.sources=[{{path: {w.data}, weight: -1}}]"], "weight", out=_o("r12")),
    Case("train-stages-type", lambda w: ["train", stages_recipe(w), "--out", w.p("r13")], "'stages' must be a list", out=_o("r13")),
    Case("train-batch", lambda w: ["train", w.recipe, "--out", w.p("r14"), *T, "train.global_batch=0"], "train.global_batch", out=_o("r14")),
    Case("train-every", lambda w: ["train", w.recipe, "--out", w.p("r15"), *T, "checkpoint.every_tokens=0"], "checkpoint.every_tokens", out=_o("r15")),
    Case("train-out-file", lambda w: ["train", w.recipe, "--out", w.a_file], "is a file", keep=lambda w: w.a_file),
    Case("train-max-steps", lambda w: ["train", w.recipe, "--out", w.p("r16"), "--max-steps", "x"], "--max-steps", code=2, out=_o("r16")),
    Case("train-max-steps-0", lambda w: ["train", w.recipe, "--out", w.p("r20"), "--max-steps", "0"], "--max-steps", out=_o("r20")),
    Case("pair-max-steps-neg", lambda w: ["pair", w.recipe, "--out", w.p("p2"), "--max-steps", "-5"], "--max-steps", out=_o("p2")),
    Case("train-seq-len-huge", lambda w: ["train", w.recipe, "--out", w.p("r21"), *T, "train.seq_len=10000000000"], "train.seq_len", out=_o("r21")),
    Case("train-warmup-1e30", lambda w: ["train", w.recipe, "--out", w.p("r22"), *T, "optim.schedule.warmup_tokens=1e30"], "warmup_tokens", out=_o("r22")),
    Case("train-vocab-huge", lambda w: ["train", w.recipe, "--out", w.p("r23"), *T, "model.vocab_size=100000000000"], "vocab_size", out=_o("r23")),
    Case("train-betas-type", lambda w: ["train", w.recipe, "--out", w.p("r24"), *T, "optim.betas=0.9"], "optim.betas", out=_o("r24")),
    Case("train-epochs-0", lambda w: ["train", w.recipe, "--out", w.p("r25"), *T, f"data.sources=[{{path: {w.data}, epochs: 0}}]"], "epochs", out=_o("r25")),
    Case("train-override-size", lambda w: ["train", w.recipe, "--out", w.p("r26"), *T, "model.overrides={hidden: 100000000}"], "model.overrides.hidden", out=_o("r26")),
    Case("train-override-type", lambda w: ["train", w.recipe, "--out", w.p("r27"), *T, "model.overrides={norm_eps: abc}"], "norm_eps", out=_o("r27")),
    Case("train-data-dotdot", lambda w: ["train", w.recipe, "--out", w.p("r17"), *T, f"data.sources=[{{path: {manifest_escape('dotdot')(w)}, weight: 1}}]"], "outside", out=_o("r17")),
    Case("train-data-bad-id", lambda w: ["train", w.recipe, "--out", w.p("r18"), *T, f"data.sources=[{{path: {_bad_token_data(w)}, weight: 1}}]", "--no-progress"],
         "outside the model's vocabulary", out=_o("r18")),
    Case("train-init-nan", lambda w: ["train", w.recipe, "--out", w.p("r19"), *T, f"model.init_from={w.nan_ckpt}"], "NaN or Inf", out=_o("r19")),
    Case("pair-objective", lambda w: ["pair", w.recipe, "--out", w.p("p1"), *T, "train.objective=mlm"], "must be unset", out=_o("p1")),
    Case("pair-out-file", lambda w: ["pair", w.recipe, "--out", w.a_file], "is a file", keep=lambda w: w.a_file),
    Case("batches-step", lambda w: ["batches", w.run, "--step", "999"], "outside the run"),
    # convert
    Case("convert-objective", lambda w: ["convert", w.ckpt, "--objective", "xyz", "--recipe", w.recipe, "--out", w.p("c1")], "--objective", out=_o("c1")),
    Case("convert-missing", lambda w: ["convert", w.p("nope"), "--objective", "clm", "--recipe", w.recipe, "--out", w.p("c2")], "no such checkpoint", out=_o("c2")),
    Case("convert-nan", lambda w: ["convert", w.nan_ckpt, "--objective", "clm", "--recipe", w.recipe, "--out", w.p("c3")], "NaN or Inf", out=_o("c3")),
    # export / import
    Case("export-nan", lambda w: ["export", w.nan_ckpt, "--out", w.p("e1")], "NaN or Inf", out=_o("e1")),
    Case("export-foreign", lambda w: ["export", w.ckpt, "--out", w.precious], "--force", keep=lambda w: w.notes),
    Case("export-out-file", lambda w: ["export", w.ckpt, "--out", w.a_file, "--force"], "is a file", keep=lambda w: w.a_file),
    Case("export-run-dir", lambda w: ["export", w.ckpt, "--out", w.run, "--force"], "training run", keep=lambda w: w.run / "metrics.jsonl"),
    Case("export-config-huge", lambda w: ["export", ckpt_with(w, "ck-huge", hidden=10**9, intermediate=10**9), "--out", w.p("e2")], "hidden", out=_o("e2")),
    Case("export-config-type", lambda w: ["export", ckpt_with(w, "ck-type", rope_theta_global="high"), "--out", w.p("e3")], "rope_theta_global", out=_o("e3")),
    Case("export-missing", lambda w: ["export", w.p("nope"), "--out", w.p("e4")], "no such checkpoint", out=_o("e4")),
    Case("import-huge", lambda w: ["import", hf_with(w, "hf-huge", hidden_size=2**40), "--out", w.p("m1")], "hidden", out=_o("m1")),
    Case("import-type", lambda w: ["import", hf_with(w, "hf-type", num_hidden_layers="many"), "--out", w.p("m2")], "num_hidden_layers", out=_o("m2")),
    Case("import-nan", lambda w: ["import", hf_nan(w), "--out", w.p("m3")], "NaN or Inf", out=_o("m3")),
    Case("import-foreign", lambda w: ["import", w.hf, "--out", w.precious], "--force", keep=lambda w: w.notes),
    Case("import-run-ckpt", lambda w: ["import", w.hf, "--out", RunDir(w.run).list_checkpoints()[-1][1], "--force"], "training run",
         keep=lambda w: RunDir(w.run).list_checkpoints()[-1][1] / "model.safetensors"),
    # eval / embed
    Case("eval-nan", lambda w: ["eval", w.nan_ckpt, "--tasks", "mc", "--data", w.evaldata, "--no-log"], "NaN or Inf"),
    Case("eval-task", lambda w: ["eval", w.ckpt, "--tasks", "nosuchtask", "--data", w.evaldata, "--no-log"], "nosuchtask"),
    Case("embed-nan", lambda w: ["embed", w.nan_ckpt, "--input", w.texts, "--out", w.p("x1.npy")], "NaN or Inf", out=_o("x1.npy")),
    Case("embed-input-missing", lambda w: ["embed", w.ckpt, "--input", w.p("nope.jsonl"), "--out", w.p("x2.npy")], "nope.jsonl", out=_o("x2.npy")),
    Case("embed-out-is-dir", lambda w: ["embed", w.ckpt, "--input", w.texts, "--out", w.precious], "precious", keep=lambda w: w.notes),
    Case("embed-out-under-file", lambda w: ["embed", w.ckpt, "--input", w.texts, "--out", w.a_file / "x.npy"], "a_file", keep=lambda w: w.a_file),
    Case("embed-batch-tokens-0", lambda w: ["embed", w.ckpt, "--input", w.texts, "--out", w.p("x3.npy"), "--batch-tokens", "0"], "--batch-tokens", code=2, out=_o("x3.npy")),
    # report
    Case("report-foreign-html", lambda w: ["report", w.run, "--out", foreign_html(w)], "--force", keep=lambda w: w.p("foreign.html")),
    Case("report-foreign-files", lambda w: ["report", w.run, "--out", report_files_foreign(w)], "--force", out=_o("rep.html"), keep=lambda w: w.p("rep_files") / "mine.txt"),
    Case("report-out-dir", lambda w: ["report", w.run, "--out", w.precious], "is a directory", keep=lambda w: w.notes),
    Case("report-md-is-dir", lambda w: ["report", w.run, "--out", (w.p("mdd.md").mkdir(exist_ok=True), w.p("mdd.html"))[1]], "is a directory", out=_o("mdd.html")),
    # deeply nested JSON/YAML in every file a command parses
    Case("deep-ettin-json", lambda w: ["export", deep_file(w, "dj1", w.ckpt, "ettin.json"), "--out", w.p("dj1o")], "ettin.json", out=_o("dj1o")),
    Case("deep-config-json", lambda w: ["import", deep_file(w, "dj2", w.hf, "config.json"), "--out", w.p("dj2o")], "config.json", out=_o("dj2o")),
    Case("deep-manifest", lambda w: ["data", "info", deep_file(w, "dj3", w.data, "manifest.json")], "manifest.json"),
    Case("deep-tokenizer-meta", lambda w: ["tokenizer", "info", deep_file(w, "dj4", w.tok, "ettin_tokenizer.json")], "ettin_tokenizer.json"),
    Case("deep-recipe", lambda w: ["train", deep_file(w, "dj5", w.p("nope"), "r.yaml") / "r.yaml", "--out", w.p("dj5o")], "nested too deeply", out=_o("dj5o")),
    Case("report-missing-run", lambda w: ["report", w.p("nope"), "--out", w.p("rep2.html")], "nope", out=_o("rep2.html")),
    Case("report-plain-file", lambda w: ["report", w.a_file, "--out", w.p("rep3.html")], "is a file", out=_o("rep3.html")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, case, monkeypatch, capsys):
    argv = [str(a) for a in case.argv(world)]
    kept = case.keep(world).read_bytes() if case.keep else None
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.words in lines[0] and "internal error" not in lines[0], err
    if case.out is not None:
        assert not case.out(world).exists(), f"{case.out(world)} left behind"
    if kept is not None:
        assert case.keep(world).read_bytes() == kept
    assert leftovers(world.root) == []


def test_absurd_budget_fails_fast(world, monkeypatch, capsys):
    t0 = time.perf_counter()
    code, _, err = run_cli(monkeypatch, capsys, "train", world.recipe, "--out", world.p("fast"), "--set", "train.tokens=1e30")
    assert code == 1 and "train.tokens" in err and time.perf_counter() - t0 < 1.0


def test_force_replaces_only_what_it_may(world, monkeypatch, capsys):
    """--force replaces a foreign directory for init; an earlier output of the same command needs nothing."""
    out = world.p("forced")
    out.mkdir()
    (out / "junk.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "init", "--size", "micro", "--kind", "encoder", "--out", out, "--force")
    assert code == 0, err
    assert (out / "ettin.json").is_file() and not (out / "junk.txt").exists()
    code, _, err = run_cli(monkeypatch, capsys, "init", "--size", "micro", "--kind", "decoder", "--out", out)
    assert code == 0, err  # its own checkpoint: replaced
    # a report replaces its own outputs, including a _files/ holding only its plots
    rep = world.p("own.html")
    for _ in range(2):
        code, _, err = run_cli(monkeypatch, capsys, "report", world.run, "--out", rep)
        assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "report", world.run, "--out", report_files_foreign(world), "--force")
    assert code == 0, err


# -- NaN guard and failed starts --------------------------------------------------------------
def test_nan_guard_names_only_a_good_checkpoint(world):
    """LR 1e6 without warmup, a checkpoint every step: the error never names a checkpoint whose
    weights are non-finite or whose next-step loss was non-finite."""
    recipe = tiny_recipe(world.p("nan.yaml"), world.data, steps=6, **{"optim.lr": 1e6, "optim.name": "adamw"})
    run = world.p("nan-run")
    with pytest.raises(EttinError) as e:
        train(recipe, run, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and ("not finite" in msg or "loss is" in msg)
    step = int(msg.split(":")[0].split()[1])
    for s, p in RunDir(run).list_checkpoints():
        w = load_file(str(p / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in w.values()), f"non-finite checkpoint {p} was written"
    assert [q.name for q in (run / "checkpoints").iterdir() if q.name.endswith(".nonfinite")] == (
        [f"{step - 1:08d}.nonfinite"] if "loss is" in msg and step > 1 else [])
    if "last good checkpoint: " in msg:
        named = Path(msg.split("last good checkpoint: ")[1].split(")")[0])
        bad_from = step - 1 if "loss is" in msg else step
        assert int(named.name) < bad_from
    else:
        assert "there is no good checkpoint" in msg
        assert RunDir(run).list_checkpoints() == []


def test_nan_after_a_checkpoint_does_not_block_a_fixed_rerun(world):
    bad = tiny_recipe(world.p("bad1.yaml"), world.data, steps=4, every=1, **{"optim.lr": 1e6})
    run = world.p("poison1")
    with pytest.raises(EttinError, match="there is no good checkpoint"):
        train(bad, run, progress=False)
    good = tiny_recipe(world.p("good1.yaml"), world.data, steps=2, every=1)
    assert train(good, run, progress=False)["steps"] == 2


def test_failed_start_does_not_poison_and_changed_recipe_names_field(world):
    bad = tiny_recipe(world.p("bad.yaml"), world.data, steps=4, every=100, **{"optim.lr": 1e6, "optim.name": "adamw"})
    run = world.p("poison")
    with pytest.raises(EttinError, match="loss is|not finite"):
        train(bad, run, progress=False)
    assert not RunDir(run).list_checkpoints()
    good = tiny_recipe(world.p("good.yaml"), world.data, steps=2, every=1)
    res = train(good, run, progress=False)  # the fixed recipe reruns in the same directory
    assert res["steps"] == 2 and [s for s, _ in RunDir(run).list_checkpoints()] == [1, 2]
    changed = tiny_recipe(world.p("changed.yaml"), world.data, steps=2, every=1, **{"optim.lr": 1e-3})
    with pytest.raises(EttinError, match=r"'optim\.lr' was 0\.003, now 0\.001"):
        train(changed, run, progress=False)


# -- kills ------------------------------------------------------------------------------------
def _cli_proc(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "ettin", *map(str, args)], env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300, **kw)


def _final_weights(run: Path) -> dict:
    step, path = RunDir(run).list_checkpoints()[-1]
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items()}


def test_pair_kill_between_saves_resumes_with_keep_last(world):
    recipe = tiny_recipe(world.p("pair.yaml"), world.data, steps=3, every=1, **{"checkpoint.keep": "last"})
    ref = world.p("pair-ref")
    train(recipe, ref, pair=True, progress=False)
    run = world.p("pair-kill")
    r = _cli_proc("pair", recipe, "--out", run, "--no-progress", env={"ETTIN_FAULT": "between-pair-saves@2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    enc = [s for s, _ in RunDir(run / "encoder").list_checkpoints()]
    dec = [s for s, _ in RunDir(run / "decoder").list_checkpoints()]
    assert enc == [1, 2] and dec == [1]  # the encoder kept step 1 until the decoder has step 2
    res = train(recipe, run, pair=True, progress=False)  # the resume (in-process: faster)
    assert res["resumed_from"] == 1 and res["finished"]
    for side in ("encoder", "decoder"):
        assert [s for s, _ in RunDir(run / side).list_checkpoints()] == [3]
        a, b = _final_weights(run / side), _final_weights(ref / side)
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert leftovers(run) == []


def test_kill_at_random_points_then_resume(world):
    """SIGKILL at seeded random points (mid-step, inside a checkpoint write); each resume goes on
    and the result equals an uninterrupted run bit for bit."""
    import random

    recipe = tiny_recipe(world.p("kill.yaml"), world.data, steps=6, every=1)
    ref = world.p("kill-ref")
    train(recipe, ref, progress=False)
    run = world.p("kill-run")
    rng = random.Random(15)
    points = [("train-step", rng.randint(2, 3)), ("atomic-dir-before-rename", rng.randint(2, 4))]
    for name, nth in points:
        r = _cli_proc("train", recipe, "--out", run, "--no-progress", env={"ETTIN_FAULT": f"{name}@{nth}"})
        assert r.returncode == -signal.SIGKILL, (name, nth, r.stderr)
    assert train(recipe, run, progress=False)["finished"]  # the resume (in-process: faster)
    a, b = _final_weights(run), _final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert leftovers(run) == []


def test_kill_inside_atomic_replace_restores_the_old_version(tmp_path):
    """A writer killed between moving the old directory aside and renaming the new one in: the
    next writer puts the old one back (nothing lost), then replaces it normally."""
    target = tmp_path / "thing"
    target.mkdir()
    (target / "v").write_text("old")
    code = (
        "import os, signal\nfrom pathlib import Path\nfrom ettin import fsutil\n"
        "real = os.replace\ncalls = []\n"
        "def rep(a, b):\n    calls.append(1)\n    real(a, b)\n    if len(calls) == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        "fsutil.os.replace = rep\n"
        f"with fsutil.atomic_dir(Path({str(target)!r})) as t:\n    (t / 'v').write_text('new')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not target.exists() and leftovers(tmp_path)  # the moment of the kill
    from ettin.fsutil import remove_stale_tmp

    remove_stale_tmp(tmp_path)
    assert (target / "v").read_text() == "old" and leftovers(tmp_path) == []


def test_stale_tmp_of_a_killed_run_is_removed(world):
    pid = _dead_pid()
    ck = world.run / "checkpoints"
    stale = ck / f".00000009.tmp-{pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = ck / f".00000009.tmp-{os.getppid()}-live1234"  # a running process's: left alone
    live.mkdir()
    train(world.recipe, world.run, progress=False)  # resumes (already finished): cleans up on the way
    assert not stale.exists() and live.exists()
    live.rmdir()


# -- disk full and other OS errors ------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 1 MB tmpfs when this process may mount one, else None."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(world, small_fs, monkeypatch, capsys):
    if small_fs is not None:
        out = small_fs / "ck"
        code, _, err = run_cli(monkeypatch, capsys, "init", "--size", "micro", "--kind", "encoder", "--out", out)
        assert code == 1 and err.count("\n") == 1 and "disk full" in err, err
        assert list(small_fs.iterdir()) == []
        code, _, err = run_cli(monkeypatch, capsys, "data", "prepare", world.texts, "--tokenizer", world.tok, "--out", small_fs / "d", "-q",
                               "--workers", "1")
        assert code == 0 or ("disk full" in err and list(small_fs.iterdir()) == []), err
        shutil.rmtree(small_fs / "d", ignore_errors=True)
    # the patched writer (always): ENOSPC in the middle of writing a checkpoint
    import ettin.checkpoint as C

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C, "save_file", full)
    out = world.p("full-ck")
    code, _, err = run_cli(monkeypatch, capsys, "init", "--size", "micro", "--kind", "encoder", "--out", out)
    assert code == 1 and err.count("\n") == 1 and "disk full" in err, err
    assert not out.exists() and leftovers(world.root) == []


def test_os_errors_are_one_line(world, tmp_path):
    r = subprocess.run(f"{sys.executable} -m ettin sizes > /dev/full", shell=True, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "disk full" in r.stderr, r.stderr
    if os.geteuid() != 0:  # root writes anywhere: the unwritable case needs an ordinary user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        r = _cli_proc("init", "--size", "micro", "--kind", "encoder", "--out", ro / "ck")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ermission denied" in r.stderr, r.stderr


# -- concurrency ------------------------------------------------------------------------------
def test_one_writer_per_run_directory(world, monkeypatch, capsys):
    """While a real ``ettin train`` runs, a second train/pair/convert on its --out fails at once
    naming its pid; after a kill -9 the lock is gone (the kernel drops it) and a rerun works."""
    run = world.p("locked")
    recipe = tiny_recipe(world.p("long.yaml"), world.data, steps=400, every=400)
    holder = subprocess.Popen([sys.executable, "-m", "ettin", "train", str(recipe), "--out", str(run), "--no-progress"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0):
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read().decode() if holder.poll() is not None else "timeout"
            time.sleep(0.1)
        for argv in (["train", recipe, "--out", run], ["pair", recipe, "--out", run],
                     ["convert", world.ckpt, "--objective", "clm", "--recipe", recipe, "--out", run]):
            t0 = time.perf_counter()
            code, _, err = run_cli(monkeypatch, capsys, *argv, "--no-progress")
            assert code == 1 and err.count("\n") == 1 and f"pid {holder.pid}" in err, err
            assert time.perf_counter() - t0 < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # the file stays, the lock does not
    code, out, err = run_cli(monkeypatch, capsys, "train", recipe, "--out", run, "--no-progress", "--max-steps", "1")
    assert code == 0 and "stopped at step 1" in out, err


# -- pathological text ------------------------------------------------------------------------
def test_long_document_is_split_without_changing_ids(world, monkeypatch):
    """A document far longer than PIECE_CHARS is tokenized in pieces: ids equal the whole text's."""
    from tokenizers import Tokenizer

    import ettin.data.prepare as P
    from ettin.data.shards import TokenData

    words = [f"w{i % 97}x{'y' * (i % 5)}" for i in range(6000)]
    text = " ".join(words) + "  double  spaces\tand\nnewlines \u3000 ideographic"
    src = _write_jsonl(world.p("long.jsonl"), [json.dumps({"text": text}), json.dumps({"text": "short one"})])
    monkeypatch.setattr(P, "PIECE_CHARS", 500)
    P.prepare([src], world.tok, world.p("long-data"), workers=1)
    td = TokenData(world.p("long-data"))
    tok = Tokenizer.from_file(str(world.tok / "tokenizer.json"))
    assert td.document(0)[1:-1].tolist() == tok.encode(text, add_special_tokens=False).ids
    assert td.document(1)[1:-1].tolist() == tok.encode("short one", add_special_tokens=False).ids
    assert len(P.split_points(text, 500)) > 50


def test_one_huge_line_keeps_memory_bounded(world, tmp_path):
    """Peak RSS of prepare on one 4.4 MB line stays near that of a tiny input (measured +90 MB; +700 MB when held whole)."""
    big = " ".join(f"word{i % 1000}" for i in range(500_000))  # ~4.4 MB, ~1M tokens
    src = _write_jsonl(tmp_path / "big.jsonl", [json.dumps({"text": big})])
    code = (
        "import resource, sys\nfrom ettin.data.prepare import prepare\n"
        "prepare([sys.argv[1]], sys.argv[2], sys.argv[3], workers=1)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peaks = []
    for inp, out in ((world.texts, tmp_path / "small"), (src, tmp_path / "bigout")):
        r = subprocess.run([sys.executable, "-c", code, str(inp), str(world.tok), str(out)], env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stdout.split()[-1]) / 1024)
    assert peaks[1] - peaks[0] < 300, f"peak RSS {peaks[0]:.0f} MB -> {peaks[1]:.0f} MB"
