"""Tokens per step and steps per stage: what a packed run's steps hold, stated up front.

Our steps are packed: a row is ``seq_len`` tokens of concatenated documents, no padding, so a
step of R rows holds exactly ``R * seq_len`` tokens. Ettin counts its batch in samples (4,608
per step), each one document of at most ``seq_len`` tokens, unpadded and unpacked, so at 7,999
tokens a step holds ``4,608 * (mean sample length)`` tokens, fewer than 4,608 full rows.
``train.tokens_per_sample`` (a number, or ``auto`` to measure it from the stage's data) makes a
step take the packed rows holding that many tokens, so token budgets and step counts match.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ettin.train.recipe import Stage
from ettin.train.schedule import Plan


def mean_sample_tokens(mix, seq_len: int) -> float:
    """Mean tokens of a sample when each document is cut into pieces of at most ``seq_len``.

    Sources are weighted by their tokens in one mixture epoch (their ``target_tokens``), so the
    figure is that of the stage's sample stream. Rounded to 0.01 token.
    """
    tokens = samples = 0.0
    for s in mix.sources:
        lens = np.asarray(s.data.doc_len, dtype=np.int64)
        src_tokens = float(lens.sum())
        if src_tokens <= 0:
            continue
        pieces = float((-(-lens // seq_len)).sum())  # ceil(len / seq_len) samples per document
        tokens += s.target_tokens
        samples += s.target_tokens * pieces / src_tokens
    if samples <= 0:
        return float(seq_len)
    return round(min(float(seq_len), tokens / samples), 2)


def resolve_samples(stages: list[Stage], open_mixture) -> list[Stage]:
    """Replace ``train.tokens_per_sample: auto`` by the figure measured on the stage's data."""
    out = []
    for st in stages:
        if st.train.tokens_per_sample == "auto":
            tps = mean_sample_tokens(open_mixture(st), st.train.seq_len)
            st = replace(st, train=replace(st.train, tokens_per_sample=tps))
        out.append(st)
    return out


def plan_lines(summary: list[dict]) -> list[str]:
    """One human line per stage (what ``ettin train`` prints before the first step)."""
    lines = []
    for r in summary:
        lines.append(
            f"{r['stage']}: {r['steps']:,} steps ({r['first_step']:,}-{r['last_step']:,}), "
            f"{r['samples_per_step']:,} samples x {r['tokens_per_sample']:,.2f} tokens = "
            f"{r['rows_per_step']:,} rows x {r['seq_len']:,} = {r['tokens_per_step']:,} tokens per step"
            + (f" after {r['warmup_steps']:,} batch-size warmup steps" if r["warmup_steps"] else "")
            + f"; {r['tokens']:,} tokens (recipe {r['recipe_tokens']:,})"
        )
    return lines


def write_plan(path: Path, summary: list[dict]) -> None:
    from ettin.fsutil import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"stages": summary}, indent=2) + "\n")


def plan_summary(stages: list[Stage]) -> list[dict]:
    return Plan(stages).stage_summary()
