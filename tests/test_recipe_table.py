"""docs/RECIPE.md's table pins every recipe value; SPEC section 4's numbers pin the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ettin.config import PAPER_SIZES
from ettin.train.recipe import load_recipe
from ettin.train.schedule import Plan, lr_factor

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "ettin" / "recipes"
DOC = ROOT / "docs" / "RECIPE.md"
SPEC = ROOT.parent / "shared" / "docs" / "SPEC.md"
FILES = ("stage1", "stage2", "stage3", "cross-objective")

# SPEC section 4, per size: peak LR, weight decay, LR warmup, batch-size warmup, stage 2 tokens,
# stage 3 tokens, cross-objective LR / warmup / decay / tokens (transcribed; compared with the
# spec file itself below when it is present).
SPEC4 = {
    "17m": (3e-3, 3e-4, 4e9, 125e9, 250e9, 50e9, 1.5e-3, 3e9, 10e9, 50e9),
    "32m": (3e-3, 3e-4, 4e9, 100e9, 250e9, 50e9, 1.5e-3, 3e9, 10e9, 50e9),
    "68m": (3e-3, 3e-4, 3e9, 75e9, 250e9, 50e9, 1.5e-3, 3e9, 10e9, 50e9),
    "150m": (8e-4, 1e-5, 3e9, 50e9, 250e9, 50e9, 4e-4, 3e9, 10e9, 50e9),
    "400m": (5e-4, 1e-5, 2e9, 10e9, 250e9, 50e9, 2.5e-4, 3e9, 10e9, 50e9),
    "1b": (5e-4, 5e-5, 2e9, 3e9, 83.3e9, 16.7e9, 2.5e-4, 1e9, 3.33e9, 16.7e9),
}


def parse_table() -> list[dict]:
    """The rows of the one table in docs/RECIPE.md (header: size | file | released config | keys...)."""
    lines = [ln.strip() for ln in DOC.read_text().splitlines() if ln.strip().startswith("| size |") or re.match(r"^\| (\d+[mb]|small) \|", ln.strip())]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(header), ln
        rows.append(dict(zip(header, cells)))
    return rows


def value(cell: str):
    if cell == "-":
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def raw_get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def attr_get(stage, dotted: str):
    obj = stage
    for k in dotted.split("."):
        obj = getattr(obj, k)
    return obj


def recipe_dir(size: str) -> Path:
    return RECIPES / ("small" if size == "small" else f"ettin-{size}")


ROWS = parse_table()


def test_table_covers_every_recipe_file():
    assert [(r["size"], r["file"]) for r in ROWS] == [(s, f) for s in (*PAPER_SIZES, "small") for f in FILES]
    assert all(r["released config"] for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['size']}-{r['file']}" for r in ROWS])
def test_every_recipe_value_matches_the_table(row):
    path = recipe_dir(row["size"]) / f"{row['file']}.yaml"
    raw = yaml.safe_load(path.read_text())
    (stage,) = load_recipe(path)
    for key, cell in row.items():
        if "." not in key:
            continue
        want = value(cell)
        if want is None:
            assert raw_get(raw, key) is None, (path, key, "the table says the key is unset")
            continue
        got = attr_get(stage, key)
        if isinstance(want, str):
            assert got == want, (path, key, got, want)
        else:
            assert float(got) == pytest.approx(want, rel=1e-12), (path, key, got, want)


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_table_carries_spec_section_4(size):
    lr, wd, warm, bwarm, t2, t3, xlr, xwarm, xdecay, xtok = SPEC4[size]
    r = {row["file"]: {k: value(v) for k, v in row.items()} for row in ROWS if row["size"] == size}
    s1, s2, s3, x = r["stage1"], r["stage2"], r["stage3"], r["cross-objective"]
    assert (s1["train.tokens"], s2["train.tokens"], s3["train.tokens"]) == (1.7e12, t2, t3)
    assert (s1["train.seq_len"], s2["train.seq_len"], s3["train.seq_len"], x["train.seq_len"]) == (1024, 7999, 7999, 7999)
    assert (s1["train.rope_theta"], s2["train.rope_theta"], s3["train.rope_theta"], x["train.rope_theta"]) == (1e4, 1.6e5, 1.6e5, 1.6e5)
    assert (s1["train.mask_rate"], s2["train.mask_rate"], s3["train.mask_rate"], x["train.mask_rate"]) == (0.3, 0.3, 0.15, 0.15)
    for row in (s1, s2, s3):
        assert (row["optim.lr"], row["optim.weight_decay"], row["train.seed"], row["checkpoint.every_tokens"]) == (lr, wd, 21, 8.5e9)
        assert row["train.global_batch"] == 4608 and row["model.attn_out_dropout"] == 0.1
    assert (s1["optim.schedule.kind"], s1["optim.schedule.warmup_tokens"], s1["train.batch_warmup_tokens"]) == ("warmup_constant", warm, bwarm)
    assert (s2["optim.schedule.kind"], s2["optim.schedule.start_factor"], s2["optim.schedule.end_factor"]) == ("one_minus_sqrt", 1.0, 0.5)
    assert (s3["optim.schedule.kind"], s3["optim.schedule.start_factor"], s3["optim.schedule.end_factor"]) == ("one_minus_sqrt", 0.5, 0.02)
    assert s2["train.batch_warmup_tokens"] is None and s3["train.batch_warmup_tokens"] is None
    assert (x["optim.lr"], x["optim.weight_decay"], x["train.tokens"], x["train.seed"]) == (xlr, wd, xtok, 210)
    assert (x["optim.schedule.kind"], x["optim.schedule.warmup_tokens"], x["optim.schedule.decay_tokens"]) == ("trapezoid", xwarm, xdecay)
    assert (x["optim.schedule.start_factor"], x["optim.schedule.end_factor"]) == (1.0, 0.02)
    assert (x["train.batch_warmup_tokens"], x["checkpoint.every_tokens"]) == (10e9, xdecay)  # checkpoints every 10B (1b: 3.33B)
    assert x["model.attn_out_dropout"] == 0.1 and x["train.global_batch"] == 4608
    for row in (s2, s3, x):  # the batch counts samples as Ettin does (docs/RECIPE.md)
        assert row["train.tokens_per_sample"] == "auto"


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_recipes_keep_the_common_values(size):
    stages = load_recipe(recipe_dir(size) / "all.yaml") + load_recipe(recipe_dir(size) / "cross-objective.yaml")
    for s in stages:
        assert (s.optim.name, s.optim.betas, s.optim.eps, s.optim.grad_clip) == ("stableadamw", [0.9, 0.98], 1e-6, None)
    assert [s.model.init_from for s in stages[:3]] == [None, "previous", "previous"]


def test_small_recipes_keep_the_shape():
    s1, s2, s3 = load_recipe(RECIPES / "small" / "all.yaml")
    (x,) = load_recipe(RECIPES / "small" / "cross-objective.yaml")
    assert s1.train.seq_len < s2.train.seq_len == s3.train.seq_len == x.train.seq_len
    assert s1.train.tokens > s2.train.tokens > s3.train.tokens
    assert x.optim.lr == s1.optim.lr / 2  # as 17m: 1.5e-3 after a 3e-3 peak
    t = x.train.tokens  # the cross-objective fractions of 50B: warmup 3B, decay 10B, batch warmup 10B, checkpoints 10B
    assert (x.optim.schedule.warmup_tokens / t, x.optim.schedule.decay_tokens / t) == pytest.approx((0.06, 0.2))
    assert (x.train.batch_warmup_tokens / t, x.checkpoint.every_tokens / t) == pytest.approx((0.2, 0.2))


def test_stage3_and_cross_objective_schedules_start_and_end_where_the_spec_says():
    st = load_recipe(RECIPES / "ettin-150m" / "all.yaml", ["train.tokens_per_sample=1000"])
    s3 = st[2]
    peak = s3.optim.lr
    assert lr_factor(s3.optim.schedule, 0, s3.train.tokens) == 0.5
    assert lr_factor(s3.optim.schedule, s3.train.tokens, s3.train.tokens) == pytest.approx(0.02)
    plan = Plan([s3])
    n = plan.total_steps()
    assert plan.get(1).lr == 0.5 * peak
    assert 0.02 * peak < plan.get(n).lr < 0.021 * peak  # the last step starts just before the end
    (x,) = load_recipe(RECIPES / "ettin-1b" / "cross-objective.yaml", ["train.tokens_per_sample=1000"])
    s, T = x.optim.schedule, x.train.tokens
    assert lr_factor(s, 0.5e9, T) == pytest.approx(0.5)  # linear warmup over 1B
    assert lr_factor(s, 1e9, T) == 1.0 and lr_factor(s, T - 3.33e9, T) == 1.0  # constant up to the last 3.33B
    assert lr_factor(s, T - 3.33e9 / 2, T) == pytest.approx(0.51)  # halfway down the linear decay
    assert lr_factor(s, T, T) == pytest.approx(0.02)


def test_spec_file_agrees_with_the_transcription():
    if not SPEC.is_file():
        pytest.skip("../shared/docs/SPEC.md not present")
    text = SPEC.read_text()
    sec = text[text.index("## 4."): text.index("## 5.")]

    def num(tok: str) -> float:
        tok = tok.strip()
        mult = {"B": 1e9, "T": 1e12}.get(tok[-1:], 1.0)
        return float(tok[:-1] if mult != 1.0 else tok) * mult

    seen = 0
    for line in sec.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in SPEC4 and len(cells) == 8:
            xlr, xw, xd, xt = (c.strip() for c in cells[7].split("/"))
            got = (num(cells[1]), num(cells[2]), num(cells[3]), num(cells[4]), num(cells[5]), num(cells[6]), num(xlr), num(xw), num(xd.replace("last", "")), num(xt))
            assert got == pytest.approx(SPEC4[cells[0]]), cells[0]
            seen += 1
    assert seen == 6
