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
    # every record names the machine (bench/machine.py)
    for x in rows:
        for key in ("cpu", "cpu_vendor", "cpu_flags", "torch", "threads"):
            assert key in x, key


def test_train_speed_profile_groups_a_step(tmp_path):
    """``train_speed.py --profile``: one profiled step per side, self time split into groups that add up."""
    cmd = [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--profile", "--size", "tiny", "--kind", "encoder", "--batch", "2",
           "--seq-len", "64", "--warmup", "1", "--threads", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["impl"] for x in recs] == ["ettin", "transformers"]
    for x in recs:
        g = x["groups_ms"]
        assert abs(sum(g.values()) - x["self_cpu_ms"]) <= 0.1 * len(g)
        for key in ("linears/matmul", "head+loss", "attention", "optimizer"):
            assert g[key] > 0, (x["impl"], key, g)
        assert x["cpu"] and "cpu_flags" in x and x["cpu_kernels"]["linear"] in ("onednn", "aten")


def test_op_groups():
    sys.path.insert(0, str(ROOT / "bench"))
    from train_speed import op_group

    V = 1000
    assert op_group("aten::mm", [[8, 64], [64, V]], V) == "head+loss"
    assert op_group("mkldnn::_linear_pointwise", [[8, 64], [192, 64]], V) == "linears/matmul"
    assert op_group("aten::_log_softmax_backward_data", [[8, 7]], V) == "head+loss"
    assert op_group("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], V) == "attention"
    assert op_group("aten::native_layer_norm", [], V) == "norms"
    assert op_group("aten::gelu_backward", [], V) == "activation"
    assert op_group("aten::lerp_", [[V, 64]], V, ("Optimizer.step#StableAdamW.step",)) == "optimizer"
    assert op_group("aten::copy_", [[8, 64]], V) == "copies/alloc"
    assert op_group("aten::embedding_dense_backward", [[8, 64], [V, 64]], V) == "embedding"


def test_cpu_levers_ab_runs_each_lever_on_its_workloads():
    """``cpu_levers.py``: every lever timed on and off on the workloads it touches, machine named."""
    cmd = [sys.executable, str(ROOT / "bench" / "cpu_levers.py"), "--size", "tiny", "--reps", "1", "--seqs", "8", "--rows", "2",
           "--threads", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted((x["workload"], x["lever"]) for x in recs) == sorted(
        [("infer", "paired_rope"), ("encoder", "paired_rope"), ("encoder", "one_exp"),
         ("decoder", "paired_rope"), ("decoder", "one_exp")])
    for x in recs:
        assert x["on_ms"] > 0 and x["off_ms"] > 0 and x["cpu"] and "cpu_flags" in x
