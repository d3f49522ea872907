"""The prepared GPU benchmark runs end to end (``--smoke``: tiny sizes on the CPU), so a session
with a GPU can spend its minutes measuring rather than debugging the script."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_matrix_smoke(tmp_path):
    out = tmp_path / "m.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_matrix.py"), "--smoke", "--out", str(out), "--only", "train,infer,parallel",
           "--workdir", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train = [(x["impl"], x["kind"]) for x in rows if x["item"] == "train"]
    assert sorted(train) == sorted((i, k) for i in ("ettin", "transformers") for k in ("encoder", "decoder"))
    assert [x["parallel"] for x in rows if x["item"] == "parallel"] == ["none", "ddp", "fsdp2"]
    infer = sorted((x["impl"], x["strategy"]) for x in rows if x["item"] == "infer")
    assert infer == [("ettin", "packed"), ("ettin", "padded"), ("transformers", "padded")]
    for x in rows:
        assert "error" not in x
        assert x["tokens_per_s"] > 0 and x["size"] == "tiny" and x["device"] == "cpu"
        for key in ("batch", "seq_len", "peak_memory_gib") + (("mfu",) if x["item"] != "infer" else ()):
            assert key in x
