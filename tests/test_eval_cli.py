"""``ettin eval``: model discovery (checkpoint, run dir, pair, HF dir), JSON, eval.jsonl, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.errors import EttinError
from ettin.eval import EvalOptions, evaluate, load_for_eval, prepare, resolve_tasks
from ettin.eval.testing import tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tok_dir):
    run = tmp_path_factory.mktemp("runs") / "pair"
    for kind in ("encoder", "decoder"):
        for step in (10, 2):  # directory order must not matter: sorted by step
            tiny_checkpoint(run / kind / "checkpoints" / str(step), kind, tok_dir, seed=step, step=step, tokens=step * 1000)
    return run


def _eval(args):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_single_checkpoint_json(pair, data, tmp_path):
    ck = pair / "decoder" / "checkpoints" / "2"
    out = tmp_path / "r.json"
    res = _eval([ck, "--tasks", "arc_easy,winogrande", "--data", data, "--json", out])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc) == {"model", "results"} and doc["model"] == str(ck)
    assert set(doc["results"]) == {"arc_easy", "winogrande"}
    assert set(doc["results"]["arc_easy"]) == {"acc", "acc_norm", "n", "scoring"} and doc["results"]["arc_easy"]["n"] == 4
    assert "arc_easy" in res.output  # the table
    assert not (pair / "decoder" / "eval.jsonl").exists()  # a bare checkpoint is not a run


def test_run_dir_trajectory_and_eval_log(pair, data, tmp_path):
    run = pair / "encoder"
    out = tmp_path / "t.json"
    try:
        res = _eval([run, "--tasks", "mc", "--data", data, "--json", out, "--limit", "2"])
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert isinstance(doc, list) and [d["step"] for d in doc] == [2, 10] and [d["tokens"] for d in doc] == [2000, 10000]
        assert all(d["kind"] == "encoder" and set(d["results"]) == {"arc_easy", "arc_challenge", "hellaswag", "piqa", "siqa",
                                                                   "boolq", "winogrande", "openbookqa"} for d in doc)
        assert doc[0]["results"]["arc_easy"]["n"] == 2
        log = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [2, 10]
        for r in log:
            assert {"model", "checkpoint", "step", "tokens", "kind", "objective", "origin", "results"} <= set(r)
            assert r["kind"] == "encoder" and r["objective"] == "mlm" and r["origin"] == "native"
            assert r["checkpoint"].endswith(f"checkpoints/{r['step']}")
    finally:
        (run / "eval.jsonl").unlink(missing_ok=True)


def test_pair_run_gives_both_sides(pair, data, tmp_path):
    out = tmp_path / "p.json"
    try:
        res = _eval([pair, "--tasks", "lambada_openai,triviaqa", "--data", data, "--json", out])
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert [(d["kind"], d["step"]) for d in doc] == [("encoder", 2), ("encoder", 10), ("decoder", 2), ("decoder", 10)]
        assert doc[0]["results"]["lambada_openai"]["scoring"] == "ltr" and "perplexity" in doc[0]["results"]["lambada_openai"]
        assert doc[2]["results"]["lambada_openai"]["scoring"] == "causal"
        assert "perplexity" in doc[2]["results"]["lambada_openai"]
        assert doc[0]["results"]["triviaqa"]["n"] == 0 and "not applicable" in doc[0]["results"]["triviaqa"]["note"]
        for side in ("encoder", "decoder"):
            assert len((pair / side / "eval.jsonl").read_text().splitlines()) == 2
    finally:
        for side in ("encoder", "decoder"):
            (pair / side / "eval.jsonl").unlink(missing_ok=True)


def test_hf_directory(pair, data, tmp_path):
    from ettin.convert.hf import export_checkpoint

    ck = pair / "decoder" / "checkpoints" / "10"
    hf = export_checkpoint(ck, tmp_path / "hf")
    [em] = load_for_eval(hf)
    assert em.kind == "decoder" and em.run_dir is None
    [native] = load_for_eval(ck)
    a = evaluate(em, "arc_easy,lambada_openai", data)
    b = evaluate(native, "arc_easy,lambada_openai", data)
    assert a["lambada_openai"]["perplexity"] == pytest.approx(b["lambada_openai"]["perplexity"], rel=1e-4)
    assert a["arc_easy"] == b["arc_easy"]


# -- bad input ---------------------------------------------------------------------------------
def test_unknown_task_lists_known_ones(data):
    with pytest.raises(EttinError) as e:
        resolve_tasks("arc_easy,arc_medium", data)
    msg = str(e.value)
    assert "unknown task 'arc_medium'" in msg and "arc_easy" in msg and "mnli" in msg and "winogender" in msg
    assert "\n" not in msg
    with pytest.raises(EttinError, match="unknown task 'foo/bar'"):
        resolve_tasks("foo/bar", data)
    assert [s.name for s in resolve_tasks("glue,mnli", data)] == ["cola", "sst2", "mrpc", "rte", "qnli", "mnli"]
    assert len(resolve_tasks("all", data)) == 21


def test_missing_files_say_which_path(data, tmp_path):
    with pytest.raises(EttinError, match=r"task 'piqa': expected .*/mc/piqa/validation\.jsonl"):
        prepare("piqa", tmp_path, "validation", EvalOptions())
    with pytest.raises(EttinError, match=r"expected .*mc/piqa/test\.jsonl"):
        prepare("piqa", data, "test", EvalOptions())
    with pytest.raises(EttinError, match=r"expected .*glue/meta\.json"):
        prepare("cola", tmp_path, "validation", EvalOptions())
    with pytest.raises(EttinError, match=r"expected .*retrieval/cosqa/corpus\.jsonl"):
        prepare("cosqa", tmp_path, "validation", EvalOptions())
    with pytest.raises(EttinError, match=r"expected .*winogender/all_sentences\.tsv"):
        prepare("winogender", tmp_path, "validation", EvalOptions())


def test_malformed_lines_give_file_and_line(data, tmp_path):
    shutil.copytree(data / "mc" / "arc_easy", tmp_path / "mc" / "arc_easy")
    p = tmp_path / "mc" / "arc_easy" / "validation.jsonl"
    lines = p.read_text().splitlines()
    bad = lines[:2] + ['{"id": "x", "context": "broken'] + lines[2:]
    p.write_text("\n".join(bad) + "\n")
    with pytest.raises(EttinError, match=r"validation\.jsonl:3: not valid JSON"):
        prepare("arc_easy", tmp_path, "validation", EvalOptions())
    p.write_text("\n".join(lines[:1] + ['{"id": "x", "context": "q", "label": 0}']) + "\n")
    with pytest.raises(EttinError, match=r"validation\.jsonl:2: missing field 'choices'"):
        prepare("arc_easy", tmp_path, "validation", EvalOptions())
    p.write_text(json.dumps({"id": "x", "context": "q", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(EttinError, match=r"validation\.jsonl:1: label 5 is not an index"):
        prepare("arc_easy", tmp_path, "validation", EvalOptions())


def test_cli_errors_are_one_line(tmp_path, data, pair):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    shutil.copytree(data / "glue", tmp_path / "glue")
    p = tmp_path / "glue" / "sst2" / "validation.jsonl"
    p.write_text(p.read_text() + json.dumps({"id": "z", "sentence1": "x", "label": 7}) + "\n")
    ck = str(pair / "decoder" / "checkpoints" / "2")
    cases = [
        ([ck, "--tasks", "nope", "--data", str(data)], "unknown task 'nope': known tasks are arc_easy"),
        ([ck, "--tasks", "sst2", "--data", str(tmp_path)], "sst2/validation.jsonl:7: label 7 does not match glue/meta.json"),
    ]
    for args, needle in cases:
        p = subprocess.run([sys.executable, "-m", "ettin", "eval", *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 1, p.stderr
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
        assert "Traceback" not in p.stderr


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EttinError, match="not a checkpoint"):
        load_for_eval(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(EttinError, match="run directory has no checkpoints"):
        load_for_eval(tmp_path / "run")


def test_nested_runs_are_found(pair):
    models = load_for_eval(pair.parent)  # a directory holding a pair run (as a demo directory does)
    assert [(m.kind, m.step) for m in models] == [("encoder", 2), ("encoder", 10), ("decoder", 2), ("decoder", 10)]
    assert all(m._model is None for m in models)  # weights load lazily
