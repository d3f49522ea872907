"""`ettin demo` end to end at a small scale: every artefact it promises, and learning."""

import json

from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from ettin.demo import run_demo
from ettin.train.trainer import RunDir


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    s = run_demo(out, scale=0.1, progress=False)
    for side in ("encoder", "decoder"):
        run = RunDir(out / "pair" / side)
        assert run.metrics.is_file() and len(run.list_checkpoints()) >= 2
        m = [json.loads(x) for x in run.metrics.read_text().splitlines()]
        assert {r["stage"] for r in m} == {"stage1", "stage2", "stage3"}
        first = sum(r["loss"] for r in m[:3]) / 3
        last = sum(r["loss"] for r in m[-5:]) / 5
        assert last < first - 0.8, (side, first, last)  # it learns
        assert (out / "hf" / side / "config.json").is_file() and (out / "hf" / side / "tokenizer.json").is_file()
        assert (run.root / "eval.jsonl").is_file()
    for name in ("encoder-from-decoder", "decoder-from-encoder"):
        assert RunDir(out / "convert" / name).list_checkpoints()
        assert (out / "hf" / name / "config.json").is_file()
    for name in ("stage1.yaml", "stage2.yaml", "stage3.yaml", "all.yaml", "cross-objective.yaml"):
        assert (out / "recipes" / name).is_file()
    AutoModelForMaskedLM.from_pretrained(out / "hf" / "encoder")
    AutoModelForCausalLM.from_pretrained(out / "hf" / "decoder")
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 3 and s["report"] == str(out / "report.html")
