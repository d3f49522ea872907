"""1 process vs 2 processes (gloo, CPU): same batches, same losses, checkpoints load at any size."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_recipe
from ettin.train.trainer import RunDir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, nproc, extra=(), torchrun=None):
    if not (torchrun if torchrun is not None else nproc > 1):
        cmd = [sys.executable, "-m", "ettin", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "ettin", *args]
    r = subprocess.run(cmd + list(extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def metrics(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_world_size_does_not_change_training(tiny_data, tmp_path, strategy):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"train.tokens": 6 * 8 * 32, "distributed.strategy": strategy, "checkpoint.every_tokens": 3 * 8 * 32})
    run(["train", str(recipe), "--out", str(tmp_path / "one"), "--no-progress"], 1)
    run(["train", str(recipe), "--out", str(tmp_path / "two"), "--no-progress", "--max-steps", "3"], 2)
    # torchrun with one process wraps the model too (how DDP/FSDP2 cost is measured on one GPU)
    run(["train", str(recipe), "--out", str(tmp_path / "launched"), "--no-progress", "--max-steps", "3"], 1, torchrun=True)
    state = json.loads((RunDir(tmp_path / "launched").checkpoint_at(3) / "trainer" / "state.json").read_text())
    assert state["world_size"] == 1 and state["parallel"] == strategy
    for x, y in zip(metrics(tmp_path / "one")[:3], metrics(tmp_path / "launched"), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
    state = json.loads((RunDir(tmp_path / "two").checkpoint_at(3) / "trainer" / "state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == strategy
    # resume the 2-process run with 1 process: full-tensor checkpoints load at any world size
    run(["train", str(recipe), "--out", str(tmp_path / "two"), "--no-progress"], 1)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["batch_hash"] for r in a] == [r["batch_hash"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
    wa = load_file(str(RunDir(tmp_path / "one").list_checkpoints()[-1][1] / "model.safetensors"))
    wb = load_file(str(RunDir(tmp_path / "two").list_checkpoints()[-1][1] / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
