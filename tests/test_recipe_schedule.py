import math
from pathlib import Path

import pytest
import torch

from ettin.config import BATCH_WARMUP_TOKENS, PAPER_SIZES, peak_lr
from ettin.errors import EttinError
from ettin.train.optim import build_optimizer, param_groups
from ettin.train.recipe import OptimSection, ScheduleSection, load_recipe
from ettin.train.schedule import Plan, batch_size, lr_factor

RECIPES = Path(__file__).resolve().parents[1] / "src" / "ettin" / "recipes"


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_recipes_carry_the_papers_numbers(size):
    s1, s2, s3 = load_recipe(RECIPES / f"ettin-{size}" / "all.yaml")
    assert (s1.train.tokens, s2.train.tokens, s3.train.tokens) == (1_700_000_000_000, 250_000_000_000, 50_000_000_000)
    assert (s1.train.seq_len, s2.train.seq_len, s3.train.seq_len) == (1024, 7999, 7999)
    assert (s1.train.rope_theta, s2.train.rope_theta, s3.train.rope_theta) == (10_000, 160_000, 160_000)
    assert (s1.train.mask_rate, s2.train.mask_rate, s3.train.mask_rate) == (0.3, 0.3, 0.15)
    assert s1.train.global_batch == 4608 and s1.train.batch_warmup_tokens == BATCH_WARMUP_TOKENS[size]
    assert s1.optim.schedule.warmup_tokens == 4_000_000_000
    for s in (s1, s2, s3):
        assert s.optim.lr == peak_lr(size) and s.optim.betas == [0.9, 0.98] and s.optim.eps == 1e-6
        assert s.optim.weight_decay == 1e-5 and s.checkpoint.every_tokens == 8_500_000_000 and s.train.seed == 21
    assert (s2.optim.schedule.kind, s2.optim.schedule.end_factor) == ("one_minus_sqrt", 0.5)
    assert (s3.optim.schedule.start_factor, s3.optim.schedule.end_factor) == (0.5, 0.02)
    assert s2.model.init_from == "previous" and s3.model.init_from == "previous"
    (x,) = load_recipe(RECIPES / f"ettin-{size}" / "cross-objective.yaml")
    assert (x.optim.lr, x.train.tokens, x.train.mask_rate, x.train.seed) == (4e-4, 50_000_000_000, 0.15, 210)
    assert (x.optim.schedule.kind, x.optim.schedule.decay_tokens) == ("trapezoid", 10_000_000_000)


def test_checkpoint_count_matches_paper():
    stages = load_recipe(RECIPES / "ettin-150m" / "all.yaml")
    total = sum(s.train.tokens for s in stages)
    assert round(total / stages[0].checkpoint.every_tokens) == 235  # ~236 checkpoints incl. the final one


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "data:\n  sources: [{path: /nowhere}]\n"


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(EttinError, match=r"unknown key 'train.seq_lenn' \(did you mean 'train.seq_len'\?\)"):
        load_recipe(write(tmp_path, BASE + "train: {seq_lenn: 5}\n"))
    with pytest.raises(EttinError, match="'train.tokens' must be an integer"):
        load_recipe(write(tmp_path, BASE + "train: {tokens: lots}\n"))
    with pytest.raises(EttinError, match="'optim.schedule.kind' must be one of"):
        load_recipe(write(tmp_path, BASE + "optim: {schedule: {kind: cosine}}\n"))
    with pytest.raises(EttinError, match=r"r.yaml:3: invalid YAML"):
        load_recipe(write(tmp_path, "train:\n  a: [\n"))
    with pytest.raises(EttinError, match="data.sources' is empty"):
        load_recipe(write(tmp_path, "train: {tokens: 10}\n"))


def test_set_overrides_and_stage_scoped(tmp_path):
    (tmp_path / "a.yaml").write_text(BASE + "name: a\ntrain: {tokens: 100}\n")
    (tmp_path / "b.yaml").write_text(BASE + "name: b\ntrain: {tokens: 200}\n")
    (tmp_path / "all.yaml").write_text("stages: [a.yaml, b.yaml]\n")
    a, b = load_recipe(tmp_path / "all.yaml", ["train.seq_len=64", "b.train.tokens=7e3", "optim.betas=[0.8, 0.9]"])
    assert a.train.seq_len == b.train.seq_len == 64
    assert (a.train.tokens, b.train.tokens) == (100, 7000)
    assert a.optim.betas == [0.8, 0.9]
    with pytest.raises(EttinError, match="did you mean 'train.mask_rate'"):
        load_recipe(tmp_path / "all.yaml", ["train.mask_rat=0.1"])


def test_lr_schedules():
    s = ScheduleSection(kind="warmup_constant", warmup_tokens=100)
    assert lr_factor(s, 50, 1000) == 0.5 and lr_factor(s, 500, 1000) == 1.0
    s = ScheduleSection(kind="one_minus_sqrt", start_factor=1.0, end_factor=0.5)
    assert lr_factor(s, 0, 1000) == 1.0 and lr_factor(s, 1000, 1000) == 0.5
    assert math.isclose(lr_factor(s, 250, 1000), 0.5 + 0.5 * (1 - math.sqrt(0.25)))
    s = ScheduleSection(kind="linear", start_factor=1.0, end_factor=0.0)
    assert math.isclose(lr_factor(s, 300, 1000), 0.7)
    s = ScheduleSection(kind="trapezoid", warmup_tokens=100, decay_tokens=200, start_factor=1.0, end_factor=0.0)
    assert lr_factor(s, 50, 1000) == 0.5 and lr_factor(s, 700, 1000) == 1.0
    assert math.isclose(lr_factor(s, 900, 1000), 0.5) and lr_factor(s, 1000, 1000) == 0.0


def test_batch_warmup_and_plan_regroup_rows(tmp_path):
    (st,) = load_recipe(write(tmp_path, BASE + "train: {tokens: 10000, seq_len: 10, global_batch: 64, batch_warmup_tokens: 2000, batch_warmup_start: 8, batch_multiple: 8}\n"))
    assert batch_size(st, 0) == 8 and batch_size(st, 2000) == 64
    assert batch_size(st, 1000) == 32  # 8 + 56 * 0.5 = 36 -> multiple of 8
    plan = Plan([st])
    n = plan.total_steps()
    row = 0
    for k in range(1, n + 1):
        p = plan.get(k)
        assert p.start_row == row and p.rows % 8 == 0
        row += p.rows
    assert row * 10 >= 10000 and (row - plan.get(n).rows) * 10 < 10000


def test_param_groups_no_decay_on_norms_and_biases():
    from ettin.config import preset, small_vocab_specials
    from ettin.model import Transformer

    m = Transformer(preset("micro", **small_vocab_specials(64)))
    decay, no = param_groups(m, 1e-5)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    no_names = {names[id(p)] for p in no["params"]}
    assert "out_bias" in no_names and "embed_norm.weight" in no_names and "blocks.1.attn_norm.weight" in no_names
    assert no["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-5


def test_stableadamw_one_step_matches_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    m = torch.nn.Module()
    m.w = p
    cfg = OptimSection(lr=0.1, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.5)
    opt = build_optimizer(m, cfg)
    for g in opt.param_groups:
        g["lr"] = 0.05  # half the peak: decay scales by lr / peak
    g = torch.randn(4, 3)
    p.grad = g.clone()
    w0 = p.detach().clone()
    opt.step()
    b1, eps, lr, wd = 0.9, 1e-6, 0.05, 0.5  # beta2 drops out of the debiased first step
    m1 = (1 - b1) * g / (1 - b1)  # debiased first step: m = g
    v1 = g * g
    rms = torch.sqrt(torch.mean(g * g / torch.maximum(v1, torch.tensor(eps * eps))))
    lr_eff = lr / max(1.0, rms.item())
    w = w0 * (1 - (lr_eff / 0.1) * wd)
    w = w - lr_eff * m1 / (v1.sqrt() + eps)
    assert torch.allclose(p.detach(), w, atol=1e-6)
