"""The report's figures, as PNG bytes (matplotlib's object API on the Agg canvas; no pyplot).

Colours say the side (encoder blue, decoder orange); a dashed line is a converted
(cross-objective) run; several runs of one kind get shades of the same colour.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ettin.report.runs import Run, is_number

PALETTE = {
    "encoder": ["#1f77b4", "#17becf", "#0b3c8c", "#6baed6", "#3f51b5"],
    "decoder": ["#ff7f0e", "#d62728", "#b35806", "#fdae6b", "#e377c2"],
    "unknown": ["#2ca02c", "#7f7f7f", "#9467bd", "#8c564b", "#bcbd22"],
}
GENDER_COLOURS = {"male": "#4c72b0", "female": "#dd8452", "neutral": "#8c8c8c"}
MAX_POINTS = 4000  # per line; the CSV keeps every number


def run_styles(runs: list[Run]) -> dict[str, dict]:
    count: dict[str, int] = {}
    styles = {}
    for r in runs:
        kind = r.kind if r.kind in PALETTE else "unknown"
        i = count.get(kind, 0)
        count[kind] = i + 1
        styles[r.label] = {"color": PALETTE[kind][i % len(PALETTE[kind])], "linestyle": "--" if r.converted else "-"}
    return styles


def legend_name(r: Run) -> str:
    extra = f", from {r.origin.split(' from ')[0]}" if r.converted else ""
    return f"{r.label} ({r.kind} {r.objective}{extra})"


def n_label(ns) -> str:
    """'n=500', or 'n=10-500' when the points rest on different counts (a --limit among them)."""
    vals = sorted({int(n) for n in ns if is_number(n)})
    if not vals:
        return "n=?"
    return f"n={vals[0]:,}" if len(vals) == 1 else f"n={vals[0]:,}-{vals[-1]:,}"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return buf.getvalue()


def _thin(xs: list, ys: list) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    stride = math.ceil(len(xs) / MAX_POINTS)
    idx = list(range(0, len(xs), stride))
    if idx[-1] != len(xs) - 1:
        idx.append(len(xs) - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


def _ema(ys: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for y in ys:
        acc = y if acc is None else alpha * y + (1 - alpha) * acc
        out.append(acc)
    return out


def _series(run: Run, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for s in run.steps:
        x = s.get("tokens") if is_number(s.get("tokens")) else None
        y = s.get(key)
        if x is not None and is_number(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def _finish_axis(ax, title: str, drawn: bool, *, legend: bool, empty: str) -> None:
    """Title, axis label, grid and legend for a subplot against tokens (or a note when empty)."""
    ax.set_title(title, fontsize=10)
    if not drawn:
        _empty(ax, empty)
        return
    ax.set_xlabel("tokens seen", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    if legend:
        ax.legend(fontsize=7)


def _stage_lines(ax, run: Run, color: str) -> None:
    prev = None
    for s in run.steps:
        st = s.get("stage")
        if prev is not None and st != prev and is_number(s.get("tokens")):
            ax.axvline(s["tokens"], color=color, linestyle=":", linewidth=0.8, alpha=0.7)
        prev = st


def loss_plot(runs: list[Run], styles: dict) -> bytes:
    fig = Figure(figsize=(9, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    drawn = False
    for r in runs:
        xs, ys = _series(r, "loss")
        if not xs:
            continue
        st = styles[r.label]
        xs_t, ys_t = _thin(xs, ys)
        if len(xs) > 50:
            ax.plot(xs_t, ys_t, color=st["color"], linestyle=st["linestyle"], linewidth=0.6, alpha=0.3)
            sm = _ema(ys, alpha=min(1.0, 20.0 / len(ys)))
            ax.plot(*_thin(xs, sm), color=st["color"], linestyle=st["linestyle"], linewidth=1.8, label=legend_name(r))
        else:
            ax.plot(xs_t, ys_t, color=st["color"], linestyle=st["linestyle"], linewidth=1.6, marker="." if len(xs) < 30 else None,
                    label=legend_name(r))
        _stage_lines(ax, r, st["color"])
        drawn = True
    if drawn:
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax, "no training steps recorded")
    ax.set_title("Training loss: encoder vs decoder (dotted: stage boundary)")
    fig.tight_layout()
    return _png(fig)


SCHEDULES = (("lr", "learning rate"), ("batch_size", "batch size (sequences)"),
             ("mask_rate", "mask rate"), ("seq_len", "sequence length"))


def schedule_plot(runs: list[Run], styles: dict) -> bytes:
    return _png(schedule_figure(runs, styles))


def schedule_figure(runs: list[Run], styles: dict) -> Figure:
    fig = Figure(figsize=(11, 7))
    # the pair's schedules are identical by design: draw earlier runs wider so none hides another
    widths = {r.label: 1.2 + 2.4 * (len(runs) - 1 - i) / max(1, len(runs) - 1) for i, r in enumerate(runs)}
    for i, (key, title) in enumerate(SCHEDULES):
        ax = fig.add_subplot(2, 2, i + 1)
        drawn = False
        for r in runs:
            xs, ys = _series(r, key)
            if not xs:
                continue
            st = styles[r.label]
            ax.plot(*_thin(xs, ys), color=st["color"], linestyle=st["linestyle"], linewidth=widths[r.label],
                    drawstyle="steps-post" if key != "lr" else "default", label=r.label)
            drawn = True
        _finish_axis(ax, title, drawn, legend=True, empty=f"no '{key}' recorded")
    fig.suptitle("Schedules against tokens")
    fig.tight_layout()
    return fig


def task_plot(task: str, metrics: list[str], runs: list[Run], styles: dict) -> bytes:
    return _png(task_figure(task, metrics, runs, styles))


def task_figure(task: str, metrics: list[str], runs: list[Run], styles: dict) -> Figure:
    """One subplot per metric of ``task``; every run with that task is a line (both sides on one
    axis), each panel with its own legend naming the runs it draws and the n behind their points."""
    n = len(metrics)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols + 1.0, 3.4 * rows + 0.6))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        drawn = False
        for r in runs:
            evs = [e for e in r.evals if e.tokens is not None and is_number(e.results.get(task, {}).get(metric))]
            if not evs:
                continue
            pts = sorted((e.tokens, e.results[task][metric]) for e in evs)
            st = styles[r.label]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], linestyle=st["linestyle"],
                    marker="o", markersize=3.5, linewidth=1.4, label=f"{r.label} ({n_label(e.results[task].get('n') for e in evs)})")
            drawn = True
        _finish_axis(ax, metric, drawn, legend=True, empty="no points with a token count")
    fig.suptitle(f"{task}: score against tokens")
    fig.tight_layout()
    return fig


def winogender_plot(entries: list[tuple[str, dict[str, dict[str, float]]]]) -> bytes:
    """``entries``: (run label, {template set: {male/female/neutral: share}}) -> grouped bars."""
    n = len(entries)
    most = max(len(groups) for _, groups in entries)
    rotate = most > 4
    fig = Figure(figsize=(max(9.0, 1.1 * most + 2), (3.4 if rotate else 2.6) * n + 0.8))
    genders = ("male", "female", "neutral")
    for i, (label, groups) in enumerate(entries):
        ax = fig.add_subplot(n, 1, i + 1)
        names = list(groups)
        width = 0.8 / len(genders)
        for j, g in enumerate(genders):
            xs = [k + (j - 1) * width for k in range(len(names))]
            vals = [groups[name].get(g, 0.0) for name in names]
            bars = ax.bar(xs, vals, width=width, color=GENDER_COLOURS[g], label=g)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.2f}", ha="center", va="bottom",
                        fontsize=7 if len(names) <= 6 else 5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8, rotation=25 if rotate else 0, ha="right" if rotate else "center")
        top = max([1.0] + [v for grp in groups.values() for v in grp.values()])
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("share", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.suptitle("Winogender: predicted pronoun shares per template set (final checkpoint)")
    fig.tight_layout()
    return _png(fig)
