"""LR schedules, batch-size warmup and the step plan, all functions of tokens seen.

The plan maps every global step of a run to (stage, rows of that stage's sample order, LR,
mask rate, sequence length). It depends on the recipe alone, never on the world size, so
``ettin batches RUN --step N`` can recompute exactly what step N saw.

Batches are counted in *samples*. By default a sample is one packed row of ``seq_len`` tokens.
With ``train.tokens_per_sample`` a sample holds that many tokens on average, as in a run that
does not pack (Ettin: 4,608 samples per step, each a document of at most ``seq_len`` tokens), and
a step takes the packed rows holding as many tokens (:func:`rows_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ettin.train.recipe import ScheduleSection, Stage


def lr_factor(s: ScheduleSection, tokens: float, total: float) -> float:
    """Multiplier of the peak LR after ``tokens`` of a stage of ``total`` tokens."""
    warm = s.warmup_tokens
    if warm > 0 and tokens < warm:
        return s.start_factor * tokens / warm
    if s.kind == "warmup_constant":
        return s.start_factor
    if s.kind == "trapezoid":
        decay = s.decay_tokens if s.decay_tokens is not None else total // 5
        begin = total - decay
        if tokens < begin:
            return s.start_factor
        p = min(1.0, (tokens - begin) / max(1, decay))
        return s.start_factor + (s.end_factor - s.start_factor) * p
    span = max(1.0, total - warm)
    p = min(1.0, max(0.0, (tokens - warm) / span))
    if s.kind == "linear":
        return s.start_factor + (s.end_factor - s.start_factor) * p
    if s.kind == "one_minus_sqrt":
        return s.end_factor + (s.start_factor - s.end_factor) * (1.0 - math.sqrt(p))
    raise ValueError(s.kind)


def batch_size(stage: Stage, tokens: float) -> int:
    """Samples in the global batch after ``tokens`` of the stage (linear batch-size warmup)."""
    t = stage.train
    if t.batch_warmup_tokens <= 0 or tokens >= t.batch_warmup_tokens:
        return t.global_batch
    start = t.batch_warmup_start or max(1, t.global_batch // 6)
    b = start + (t.global_batch - start) * tokens / t.batch_warmup_tokens
    m = max(1, t.batch_multiple)
    return max(start, min(t.global_batch, int(b) // m * m))


def rows_for(stage: Stage, samples: int) -> int:
    """Packed rows of ``seq_len`` tokens that hold ``samples`` samples' tokens.

    A sample is a full row unless ``train.tokens_per_sample`` says otherwise; then the row count
    is rounded to the nearest multiple of ``train.batch_multiple`` (at least one multiple).
    """
    t = stage.train
    tps = t.tokens_per_sample
    if tps is None:
        return samples
    if isinstance(tps, str):
        raise ValueError(f"stage '{stage.name}': train.tokens_per_sample '{tps}' must be resolved to a number first")
    m = max(1, t.batch_multiple)
    return max(m, round(samples * float(tps) / t.seq_len / m) * m)


@dataclass(frozen=True)
class StepPlan:
    step: int  # global step of the run, 1-based
    stage_index: int
    stage_step: int  # 1-based within the stage
    start_row: int  # first row of the stage's sample order
    rows: int  # packed rows of seq_len tokens in the global batch
    tokens_before: int  # tokens of the whole run before this step
    stage_tokens_before: int
    lr: float
    seq_len: int
    mask_rate: float
    samples: int = 0  # the batch in samples (equal to rows unless train.tokens_per_sample is set)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


class Plan:
    """Lazily enumerated steps of a multi-stage run (cheap: one loop iteration per step)."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self._steps: list[StepPlan] = []
        self._stage_ends: list[int] = []  # global step of the last step of each finished stage
        self._done = False
        self._iter = self._generate()

    def _generate(self):
        step = 0
        run_tokens = 0
        for si, st in enumerate(self.stages):
            t = st.train
            stage_tokens = 0
            row = 0
            k = 0
            while stage_tokens < t.tokens:
                step += 1
                k += 1
                n = batch_size(st, stage_tokens)
                b = rows_for(st, n)
                lr = st.optim.lr * lr_factor(st.optim.schedule, stage_tokens, t.tokens)
                yield StepPlan(step, si, k, row, b, run_tokens, stage_tokens, lr, t.seq_len, t.mask_rate, n)
                row += b
                stage_tokens += b * t.seq_len
                run_tokens += b * t.seq_len
            self._stage_ends.append(step)

    def _extend_to(self, step: int) -> None:
        while not self._done and len(self._steps) < step:
            try:
                self._steps.append(next(self._iter))
            except StopIteration:
                self._done = True

    def get(self, step: int) -> StepPlan | None:
        if step < 1:
            return None
        self._extend_to(step)
        return self._steps[step - 1] if step <= len(self._steps) else None

    def total_steps(self) -> int:
        self._extend_to(1 << 62)
        return len(self._steps)

    def stage_last_step(self, stage_index: int) -> int:
        while len(self._stage_ends) <= stage_index and not self._done:
            self._extend_to(len(self._steps) + 1)
        return self._stage_ends[stage_index]

    def stage_summary(self) -> list[dict]:
        """Per stage: steps, samples and packed rows per step, tokens per step, tokens planned.

        Figures per step are those after any batch-size warmup (the last step of the stage);
        ``tokens`` is what the stage's steps hold in all (at least the recipe's budget).
        """
        self._extend_to(1 << 62)
        out = []
        first = 1
        for si, st in enumerate(self.stages):
            last_step = self._stage_ends[si]
            steps = self._steps[first - 1 : last_step]
            end = steps[-1]
            t = st.train
            out.append(
                {
                    "stage": st.name,
                    "steps": len(steps),
                    "first_step": first,
                    "last_step": last_step,
                    "samples_per_step": end.samples,
                    "tokens_per_sample": float(t.tokens_per_sample) if t.tokens_per_sample is not None else float(t.seq_len),
                    "rows_per_step": end.rows,
                    "seq_len": t.seq_len,
                    "tokens_per_step": end.tokens,
                    "tokens": sum(p.tokens for p in steps),
                    "recipe_tokens": t.tokens,
                    "warmup_steps": sum(1 for p in steps if p.samples < t.global_batch),
                }
            )
            first = last_step + 1
        return out
