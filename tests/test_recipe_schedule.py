import math
from pathlib import Path

import pytest
import torch
import yaml

from ettin.config import BATCH_WARMUP_TOKENS, CROSS_OBJECTIVE, LR_WARMUP_TOKENS, PAPER_SIZES, WEIGHT_DECAY, peak_lr
from ettin.errors import EttinError
from ettin.train.optim import build_optimizer, param_groups
from ettin.train.recipe import OptimSection, ScheduleSection, load_recipe
from ettin.train.schedule import Plan, batch_size, lr_factor

RECIPES = Path(__file__).resolve().parents[1] / "src" / "ettin" / "recipes"


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_recipes_carry_the_papers_numbers(size):
    """SPEC section 4 (docs/RECIPE.md and tests/test_recipe_table.py pin every value)."""
    s1, s2, s3 = load_recipe(RECIPES / f"ettin-{size}" / "all.yaml")
    t2, t3 = (83_300_000_000, 16_700_000_000) if size == "1b" else (250_000_000_000, 50_000_000_000)
    assert (s1.train.tokens, s2.train.tokens, s3.train.tokens) == (1_700_000_000_000, t2, t3)
    assert (s1.train.seq_len, s2.train.seq_len, s3.train.seq_len) == (1024, 7999, 7999)
    assert (s1.train.rope_theta, s2.train.rope_theta, s3.train.rope_theta) == (10_000, 160_000, 160_000)
    assert (s1.train.mask_rate, s2.train.mask_rate, s3.train.mask_rate) == (0.3, 0.3, 0.15)
    assert s1.train.global_batch == 4608 and s1.train.batch_warmup_tokens == BATCH_WARMUP_TOKENS[size]
    assert s1.optim.schedule.warmup_tokens == LR_WARMUP_TOKENS[size]
    for s in (s1, s2, s3):
        assert s.optim.lr == peak_lr(size) and s.optim.betas == [0.9, 0.98] and s.optim.eps == 1e-6
        assert s.optim.weight_decay == WEIGHT_DECAY[size] and s.checkpoint.every_tokens == 8_500_000_000 and s.train.seed == 21
        assert s.model.attn_out_dropout == 0.1
    assert (s2.optim.schedule.kind, s2.optim.schedule.end_factor) == ("one_minus_sqrt", 0.5)
    assert (s3.optim.schedule.start_factor, s3.optim.schedule.end_factor) == (0.5, 0.02)
    assert s2.model.init_from == "previous" and s3.model.init_from == "previous"
    (x,) = load_recipe(RECIPES / f"ettin-{size}" / "cross-objective.yaml")
    lr, warm, decay, tokens = CROSS_OBJECTIVE[size]
    assert (x.optim.lr, x.train.tokens, x.train.mask_rate, x.train.seed) == (lr, tokens, 0.15, 210)
    assert (x.optim.schedule.kind, x.optim.schedule.warmup_tokens, x.optim.schedule.decay_tokens) == ("trapezoid", warm, decay)
    assert (x.optim.schedule.end_factor, x.optim.weight_decay, x.model.attn_out_dropout) == (0.02, WEIGHT_DECAY[size], 0.1)


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


def test_batches_in_samples_take_the_packed_rows_that_hold_their_tokens(tmp_path):
    """train.tokens_per_sample: Ettin's 4,608 samples of a mean length become packed rows."""
    from ettin.train.schedule import rows_for

    (st,) = load_recipe(write(tmp_path, BASE + "train: {tokens: 100000, seq_len: 100, global_batch: 48, tokens_per_sample: 25, batch_multiple: 4}\n"))
    assert rows_for(st, 48) == 12  # 48 x 25 tokens = 12 rows of 100
    plan = Plan([st])
    p = plan.get(1)
    assert (p.samples, p.rows, p.tokens) == (48, 12, 1200)
    (row,) = plan.stage_summary()
    assert (row["steps"], row["tokens_per_step"], row["samples_per_step"], row["rows_per_step"]) == (84, 1200, 48, 12)
    assert row["tokens"] == 84 * 1200 >= 100000 > 83 * 1200
    (st,) = load_recipe(write(tmp_path, BASE + "train: {tokens: 100000, seq_len: 100, global_batch: 48, tokens_per_sample: 30, batch_multiple: 4}\n"))
    assert rows_for(st, 48) == 16  # 14.4 rows, rounded to the nearest multiple of 4
    (st,) = load_recipe(write(tmp_path, BASE + "train: {tokens: 1000, seq_len: 100, global_batch: 8}\n"))
    assert rows_for(st, 8) == 8 and Plan([st]).get(1).samples == 8  # unset: a sample is a full row
    with pytest.raises(EttinError, match="tokens_per_sample' must be a number of tokens or 'auto'"):
        load_recipe(write(tmp_path, BASE + "train: {tokens_per_sample: lots}\n"))
    with pytest.raises(EttinError, match="tokens_per_sample' must lie in"):
        load_recipe(write(tmp_path, BASE + "train: {seq_len: 64, tokens_per_sample: 65}\n"))


def test_auto_tokens_per_sample_is_measured_on_the_data(tiny_data, tmp_path):
    """auto: documents cut into pieces of at most seq_len tokens; the trainer writes the figure."""
    import json

    import numpy as np

    from conftest import write_recipe
    from ettin.data.shards import TokenData
    from ettin.train.trainer import train

    lens = np.asarray(TokenData(tiny_data).doc_len)
    want = round(lens.sum() / np.ceil(lens / 32).sum(), 2)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, **{"train.tokens_per_sample": "auto", "train.global_batch": 12, "train.tokens": 3 * 8 * 32})
    res = train(recipe, tmp_path / "run", progress=False)
    (row,) = res["plan"]
    assert row["tokens_per_sample"] == want < 32
    assert row["rows_per_step"] == round(12 * want / 32)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["stages"][0]["train"]["tokens_per_sample"]
    assert saved == want
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["stages"] == res["plan"]
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["samples"], r["batch_size"]) for r in m} == {(12, row["rows_per_step"])}
    res = train(recipe, tmp_path / "run", progress=False)  # rerun: the measured figure is the same recipe
    assert res["finished"] and res["resumed_from"] == row["steps"]
