"""The processor-dependent kernel choice: measured once per machine, cached, overridable, recorded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ettin.errors import EttinError
from ettin.model import cpu as C


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("ETTIN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ETTIN_ONEDNN", raising=False)
    C.reset_choice()
    yield tmp_path
    C.reset_choice()


def test_cpu_info_names_the_machine():
    info = C.cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) <= set(C.ISA_FLAGS)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    assert info["flags"] == [f for f in C.ISA_FLAGS if f in flags]
    assert C.bf16_supported() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_probe_runs_once_then_the_cache_answers(fresh, monkeypatch):
    if not C.onednn_works():
        pytest.skip("torch without oneDNN")
    monkeypatch.setenv("ETTIN_LINEAR", "probe")
    calls = []

    def fake_probe():
        calls.append(1)
        return {"aten_s": 0.02, "onednn_s": 0.01, "choice": "onednn"}

    monkeypatch.setattr(C, "probe_linear", fake_probe)
    first = C.linear_choice()
    assert first["linear"] == "onednn" and first["source"] == "probe" and calls == [1]
    stored = json.loads((fresh / "cpu_kernels.json").read_text())
    assert stored == {C.machine_key(): {"aten_s": 0.02, "onednn_s": 0.01, "choice": "onednn"}}
    C.reset_choice()  # a new process: reads the cache, does not probe again
    again = C.linear_choice()
    assert again["linear"] == "onednn" and again["source"] == "cache" and calls == [1]
    # another thread count is another key: probed afresh
    C.reset_choice()
    assert C.linear_choice(threads=torch.get_num_threads() + 1)["source"] == "probe" and calls == [1, 1]
    assert len(json.loads((fresh / "cpu_kernels.json").read_text())) == 2


def test_a_corrupt_cache_is_reprobed(fresh, monkeypatch):
    if not C.onednn_works():
        pytest.skip("torch without oneDNN")
    monkeypatch.setenv("ETTIN_LINEAR", "probe")
    (fresh / "cpu_kernels.json").write_text("{not json")
    monkeypatch.setattr(C, "probe_linear", lambda: {"aten_s": 0.01, "onednn_s": 0.02, "choice": "aten"})
    assert C.linear_choice() == {"linear": "aten", "source": "probe", "aten_s": 0.01, "onednn_s": 0.02}


def test_the_real_probe_measures_both_paths(fresh):
    if not C.onednn_works():
        pytest.skip("torch without oneDNN")
    r = C.probe_linear(rows=256, reps=2)
    assert r["aten_s"] > 0 and r["onednn_s"] > 0
    assert r["choice"] == ("onednn" if r["onednn_s"] < 0.9 * r["aten_s"] else "aten")


def test_env_forces_the_choice_and_aten_is_f_linear(fresh, monkeypatch):
    monkeypatch.setenv("ETTIN_LINEAR", "aten")
    assert C.linear_choice() == {"linear": "aten", "source": "env"}
    x, w = torch.randn(7, 16), torch.randn(5, 16)
    assert not C.use_onednn(x, w)
    assert torch.equal(C.linear(x, w), F.linear(x, w))
    C.reset_choice()
    monkeypatch.setenv("ETTIN_LINEAR", "onednn")
    monkeypatch.setenv("ETTIN_ONEDNN", "0")  # the older switch still turns oneDNN off
    assert C.linear_choice()["linear"] == "aten"
    C.reset_choice()
    monkeypatch.delenv("ETTIN_ONEDNN")
    if C.onednn_works():
        assert C.linear_choice() == {"linear": "onednn", "source": "env"} and C.use_onednn(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not C.use_onednn(x, w)  # autocast keeps its own kernels
    C.reset_choice()
    monkeypatch.setenv("ETTIN_LINEAR", "mkl")
    with pytest.raises(EttinError, match="ETTIN_LINEAR=mkl"):
        C.linear_choice()
    assert not list(fresh.iterdir())  # forced choices write nothing


def test_describe_names_the_choice(fresh, monkeypatch):
    monkeypatch.setenv("ETTIN_LINEAR", "aten")
    d = C.describe()
    assert d["linear"] == "aten" and d["linear_source"] == "env" and isinstance(d["malloc_tuned"], bool)
