"""The study's outputs: study.json, report.html (self-contained), report.md, report.csv.

study.json::

    {"sizes": [...],
     "models": {"<size>/<model>": {"size", "kind", "objective", "origin", "tokens"}},
     "results": {"<size>/<model>": {task: {<metric>: value, ..., "main": <metric>,
                                           "ci": [lo, hi],            # the main metric's interval
                                           "cis": {<metric>: [lo, hi]},  # every metric with one
                                           "n": count}}}}

Results are those of each model's final checkpoint. Trajectories (every checkpoint) and the
paired comparisons are in study-details.json. ``tokens`` of a converted model count its
pre-training plus its own continued training.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

from ettin.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from ettin.study.plan import StudyPlan
from ettin.study.stats import is_score, mean_of_differences, paired_difference

MAIN_PREF = ("ndcg@10", "exact_match", "matthews_corrcoef", "accuracy", "acc", "gotcha_preferred", "perplexity",
             "pseudo_perplexity", "male")
LOWER_BETTER = ("perplexity", "bits_per_byte")
FAMILY_NAMES = {"glue": "classification (GLUE)", "retrieval": "retrieval", "mc": "multiple choice", "lm": "LAMBADA / LM",
                "qa": "TriviaQA", "winogender": "Winogender"}
ENCODER_FAMILIES = ("glue", "retrieval")
GENERATIVE_FAMILIES = ("mc", "lm", "qa")


def main_metric(result: dict) -> str | None:
    for m in MAIN_PREF:
        if m in result and is_score(m, result[m]):
            return m
    for m, v in result.items():
        if is_score(m, v):
            return m
    return None


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in LOWER_BETTER)


def task_family(plan: StudyPlan, task: str) -> str:
    if plan.data_dir is None:
        return "lm"
    from ettin.eval.tasks import resolve_tasks

    return resolve_tasks([task], plan.data_dir)[0].family


# -- collecting ---------------------------------------------------------------------------------------
def _eval_records(plan: StudyPlan) -> dict:
    """(line label) -> step -> task -> (unit, record) for every finished evaluation."""
    out: dict = {}
    for u in plan.units:
        if u.kind != "eval" or not u.done():
            continue
        rec = json.loads(u.path.read_text())
        out.setdefault(f"{u.size}/{u.model}", {}).setdefault(u.step, {})[u.task] = (u, rec)
    return out


def _cell(result: dict, intervals: dict) -> dict:
    cell: dict = {}
    for m, v in result.items():
        if is_score(m, v):
            cell[m] = v
    main = main_metric(result)
    cis = {m: iv["ci"] for m, iv in intervals.items() if not m.startswith("_")}
    if main is not None:
        cell["main"] = main
        cell["ci"] = cis.get(main)
    cell["cis"] = cis
    cell["n"] = result.get("n")
    if result.get("note"):
        cell["note"] = result["note"]
    if intervals.get("_mismatch"):
        cell["check"] = f"recomputed from samples differs: {', '.join(intervals['_mismatch'])}"
    return cell


def collect(plan: StudyPlan) -> dict:
    cfg = plan.config
    recs = _eval_records(plan)
    models, results, traj = {}, {}, {}
    for ln in plan.lines:
        label = ln.label
        steps = recs.get(label, {})
        last_tokens = ln.base_tokens + ln.checkpoints[-1][2]
        models[label] = {"size": ln.size, "kind": ln.kind, "objective": ln.objective, "origin": ln.origin,
                         "tokens": int(last_tokens)}
        final: dict = {}
        for step in sorted(steps):  # the latest evaluated checkpoint of each task
            for task, (_u, rec) in steps[step].items():
                final[task] = _cell(rec["result"], rec.get("intervals") or {})
        results[label] = {t: final[t] for t in plan.tasks if t in final}
        traj[label] = [{"step": step, "tokens": next(iter(steps[step].values()))[1]["tokens"],
                        "results": {t: _cell(r["result"], r.get("intervals") or {}) for t, (_u, r) in steps[step].items()}}
                       for step in sorted(steps)]
    comparisons = _comparisons(plan, recs)
    study = {"sizes": list(cfg.sizes), "models": models, "results": results}
    details = {"trajectories": traj, "comparisons": comparisons, "tasks": plan.tasks,
               "families": {t: task_family(plan, t) for t in plan.tasks}, "config": cfg.to_json()}
    return {"study": study, "details": details}


def _final_unit(plan: StudyPlan, recs: dict, label: str, task: str):
    steps = recs.get(label, {})
    for step in sorted(steps, reverse=True):
        if task in steps[step]:
            return steps[step][task]
    return None


PAIRS = (("encoder", "decoder", "encoder − decoder"),
         ("encoder-from-decoder", "encoder", "encoder-from-decoder − encoder"),
         ("decoder-from-encoder", "decoder", "decoder-from-encoder − decoder"))


def _comparisons(plan: StudyPlan, recs: dict) -> list[dict]:
    from ettin.study.run import _bootstrap_seed, read_samples

    cfg = plan.config
    out = []
    cache: dict = {}

    def samples(label, task):
        key = (label, task)
        if key not in cache:
            hit = _final_unit(plan, recs, label, task)
            cache[key] = (read_samples(hit[0]), hit[1]) if hit else ([], None)
        return cache[key]

    for size in cfg.sizes:
        for a, b, what in PAIRS:
            fam_diffs: dict[str, list] = {}
            for task in plan.tasks:
                sa, ra = samples(f"{size}/{a}", task)
                sb, rb = samples(f"{size}/{b}", task)
                if ra is None or rb is None:
                    continue
                m = main_metric(ra["result"])
                if m is None or m != main_metric(rb["result"]):
                    continue
                d = paired_difference(sa, sb, m, n_boot=cfg.n_boot, seed=_bootstrap_seed(cfg, task),
                                      keep_replicates=True) if sa and sb else None
                row = {"size": size, "a": a, "b": b, "what": what, "task": task, "metric": m,
                       "a_value": ra["result"].get(m), "b_value": rb["result"].get(m)}
                if d is not None:
                    row.update({"diff": d["diff"], "ci": d["ci"], "n": d["n"], "excludes_zero": d["excludes_zero"]})
                else:
                    va, vb = ra["result"].get(m), rb["result"].get(m)
                    row.update({"diff": (va - vb) if is_score(m, va) and is_score(m, vb) else None, "ci": None,
                                "excludes_zero": None})
                fam = task_family(plan, task)
                if row["diff"] is not None and not lower_is_better(m) and fam != "winogender":
                    fam_diffs.setdefault(fam, []).append(d if d is not None else {"diff": row["diff"]})
                out.append(row)
            for fam, diffs in fam_diffs.items():
                agg = mean_of_differences(diffs) if all("replicates" in x for x in diffs) else None
                if agg is None:  # no per-example samples: the point difference, without an interval
                    agg = {"diff": sum(x["diff"] for x in diffs) / len(diffs), "ci": None, "tasks": len(diffs),
                           "excludes_zero": None}
                out.append({"size": size, "a": a, "b": b, "what": what, "family": fam, "task": None,
                            "metric": "mean of main metrics", **agg})
    return out


# -- tables ---------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _with_ci(cell: dict | None, metric: str | None = None) -> str:
    if not cell:
        return "–"
    m = metric or cell.get("main")
    if m is None or m not in cell:
        return cell.get("note", "–")[:40] if cell.get("note") else "–"
    ci = (cell.get("cis") or {}).get(m)
    s = _fmt(cell[m])
    if ci:
        s += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return s


def score_table(plan: StudyPlan, summary: dict, families: tuple, models: tuple, title: str, note: str) -> dict:
    res = summary["study"]["results"]
    fams = summary["details"]["families"]
    headers = ["task", "metric"] + [f"{s} {m}" for s in plan.config.sizes for m in models]
    rows = []
    for t in plan.tasks:
        if fams.get(t) not in families:
            continue
        mains = [res.get(f"{s}/{m}", {}).get(t, {}).get("main") for s in plan.config.sizes for m in models]
        metric = next((x for x in mains if x), None)
        rows.append([t, metric or ""] + [_with_ci(res.get(f"{s}/{m}", {}).get(t), metric) for s in plan.config.sizes for m in models])
    return {"title": title, "headers": headers, "rows": rows, "note": note}


def comparison_table(summary: dict) -> dict:
    rows = []
    for c in summary["details"]["comparisons"]:
        name = c["task"] if c.get("task") else f"{FAMILY_NAMES.get(c.get('family'), c.get('family'))} (family mean)"
        ci = c.get("ci")
        ex = c.get("excludes_zero")
        mark = "yes" if ex else ("no" if ex is not None else "n/a (no samples)")
        rows.append([c["size"], c["what"], name, c["metric"], _fmt(c.get("a_value")), _fmt(c.get("b_value")),
                     _fmt(c.get("diff")), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–", mark])
    return {"title": "Differences (paired bootstrap over the same examples)",
            "headers": ["size", "comparison", "task", "metric", "A", "B", "A − B", "95% interval", "interval excludes 0"],
            "rows": rows,
            "note": "A − B of the final checkpoints on the main metric; the interval resamples the examples both models were "
                    "scored on (and fine-tuning seeds per model). Lower is better for perplexities."}


def winogender_table(plan: StudyPlan, summary: dict) -> dict | None:
    res = summary["study"]["results"]
    keys = ("male", "female", "neutral", "gotcha_preferred")
    rows = []
    for label, tasks in res.items():
        for t, cell in tasks.items():
            if summary["details"]["families"].get(t) != "winogender":
                continue
            rows.append([label, summary["study"]["models"][label]["kind"], t] + [_with_ci(cell, k) if k in cell else "–" for k in keys]
                        + [cell.get("n")])
    if not rows:
        return None
    return {"title": "Winogender rates (final checkpoints)", "headers": ["model", "kind", "task"] + list(keys) + ["n"],
            "rows": rows, "note": "Share of male / female / neutral pronoun predictions, with 95% bootstrap intervals."}


# -- figures ----------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return buf.getvalue()


def gap_figure(plan: StudyPlan, summary: dict) -> bytes:
    from matplotlib.figure import Figure

    sizes = list(plan.config.sizes)
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    fams = {}
    for c in summary["details"]["comparisons"]:
        if c.get("family") and c["a"] == "encoder" and c["b"] == "decoder":
            fams.setdefault(c["family"], {})[c["size"]] = c
    if not fams:
        ax.text(0.5, 0.5, "no paired samples to compare", ha="center", va="center", transform=ax.transAxes, color="#777")
    xs = list(range(len(sizes)))
    for i, (fam, by_size) in enumerate(sorted(fams.items())):
        pts = [(x, by_size[s]) for x, s in zip(xs, sizes) if s in by_size]
        if not pts:
            continue
        off = (i - (len(fams) - 1) / 2) * 0.06
        x = [p[0] + off for p in pts]
        y = [p[1]["diff"] for p in pts]
        lo = [p[1]["diff"] - p[1]["ci"][0] if p[1].get("ci") else 0.0 for p in pts]
        hi = [p[1]["ci"][1] - p[1]["diff"] if p[1].get("ci") else 0.0 for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4, label=FAMILY_NAMES.get(fam, fam))
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(sizes)
    ax.set_xlabel("size")
    ax.set_ylabel("encoder − decoder (mean main metric)")
    ax.set_title("Encoder − decoder gap against size, per task family (95% paired bootstrap)")
    if fams:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


COLOURS = {"encoder": "#1f77b4", "decoder": "#ff7f0e", "encoder-from-decoder": "#17becf", "decoder-from-encoder": "#d62728"}


def trajectory_figure(plan: StudyPlan, summary: dict, task: str) -> bytes:
    from matplotlib.figure import Figure

    sizes = list(plan.config.sizes)
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(max(6.0, 4.2 * len(sizes)), 3.4))
    traj = summary["details"]["trajectories"]
    for i, size in enumerate(sizes):
        ax = fig.add_subplot(1, len(sizes), i + 1)
        metric = None
        for model, col in COLOURS.items():
            pts = [(p["tokens"], p["results"][task]) for p in traj.get(f"{size}/{model}", []) if task in p["results"]]
            if not pts:
                continue
            metric = metric or pts[-1][1].get("main")
            pts = [(x, c) for x, c in pts if metric in c and c[metric] is not None]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1][metric] for p in pts]
            ls = "--" if "from" in model else "-"
            ax.plot(x, y, ls, marker="o", ms=3, color=col, label=model)
            cis = [(p[1].get("cis") or {}).get(metric) for p in pts]
            if all(cis) and len(x) > 1:
                ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=col, alpha=0.15, lw=0)
            elif all(cis):  # one checkpoint (a conversion): an error bar
                ax.errorbar(x, y, yerr=[[y[0] - cis[0][0]], [cis[0][1] - y[0]]], color=col, capsize=3, lw=1)
        ax.set_title(f"{task} ({size})", fontsize=10)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("tokens seen")
        if metric:
            ax.set_ylabel(metric)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# -- rendering ---------------------------------------------------------------------------------------------
def _html_table(t: dict) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t["headers"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in t["rows"])
    if not t["rows"]:
        body = f'<tr><td colspan="{len(t["headers"])}">(nothing yet)</td></tr>'
    note = f'<p class="note">{html.escape(t["note"])}</p>' if t.get("note") else ""
    return f'<h2>{html.escape(t["title"])}</h2>{note}<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _md_table(t: dict) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"## {t['title']}", ""]
    if t.get("note"):
        lines += [t["note"], ""]
    lines.append("| " + " | ".join(esc(h) for h in t["headers"]) + " |")
    lines.append("|" + "|".join("---" for _ in t["headers"]) + "|")
    for row in t["rows"]:
        lines.append("| " + " | ".join(esc(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def build_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "size", "kind", "objective", "step", "tokens", "task", "metric", "value", "ci_lo", "ci_hi", "n"])
    models = summary["study"]["models"]
    for label, pts in summary["details"]["trajectories"].items():
        m = models[label]
        for p in pts:
            for task, cell in p["results"].items():
                for metric, v in cell.items():
                    if metric in ("main", "ci", "cis", "n", "note", "check"):
                        continue
                    ci = (cell.get("cis") or {}).get(metric) or [None, None]
                    w.writerow([label, m["size"], m["kind"], m["objective"], p["step"], p["tokens"], task, metric, v,
                                ci[0], ci[1], cell.get("n")])
    return buf.getvalue()


def write_study_report(plan: StudyPlan, summary: dict) -> Path:
    from ettin.report.report import _CSS, _SCRIPT

    out = Path(plan.config.out)
    atomic_write_json(out / "study.json", summary["study"])
    details = dict(summary["details"])
    details["comparisons"] = [{k: v for k, v in c.items() if k != "replicates"} for c in details["comparisons"]]
    atomic_write_json(out / "study-details.json", details)

    tables = [
        score_table(plan, summary, ENCODER_FAMILIES, ("encoder", "decoder", "encoder-from-decoder"),
                    "Encoder tasks by size", "Fine-tuned classification (GLUE; mean over seeds, interval: seeds × bootstrap) "
                    "and retrieval (nDCG@10, interval: bootstrap over queries); final checkpoints."),
        score_table(plan, summary, GENERATIVE_FAMILIES, ("decoder", "encoder", "decoder-from-encoder"),
                    "Generative tasks by size", "Zero-shot; value [95% bootstrap interval over examples]; final checkpoints."),
        comparison_table(summary),
    ]
    wt = winogender_table(plan, summary)
    if wt:
        tables.append(wt)
    images = [("gap", "Encoder − decoder gap against size", gap_figure(plan, summary))]
    for t in plan.tasks:
        images.append((f"traj_{t}", f"Trajectory: {t}", trajectory_figure(plan, summary, t)))

    files = out / "report_files"
    with atomic_dir(files) as tmp:
        for name, _title, png in images:
            (tmp / f"{_safe(name)}.png").write_bytes(png)
    atomic_write_text(out / "report.csv", build_csv(summary))

    cfg = plan.config
    intro = (f"Sizes {', '.join(cfg.sizes)}; preset {cfg.preset}; {len(plan.units)} units; tasks: {', '.join(plan.tasks)}. "
             "Every score carries a 95% interval (bootstrap over examples; seeds × bootstrap for fine-tuned tasks). "
             "All numbers: report.csv, study.json, study-details.json.")
    md = ["# ettin study", "", intro, ""]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>ettin study</title>",
             f"<style>{_CSS}</style>", f"<script>{_SCRIPT}</script>", "</head><body>", "<h1>ettin study</h1>",
             f'<p class="note">{html.escape(intro)}</p>']
    for t in tables[:2]:
        parts.append(_html_table(t))
        md.append(_md_table(t))
    parts.append("<h2>Encoder − decoder gap against size</h2>")
    md += ["## Encoder − decoder gap against size", ""]
    for name, title, png in images:
        if name == "gap":
            parts.append(_figure(name, title, png))
            md.append(f"![{title}](report_files/{_safe(name)}.png)\n")
    for t in tables[2:]:
        parts.append(_html_table(t))
        md.append(_md_table(t))
    parts.append("<h2>Trajectories (main metric against tokens seen, 95% bands)</h2>")
    md += ["## Trajectories", ""]
    for name, title, png in images:
        if name != "gap":
            parts.append(_figure(name, title, png))
            md.append(f"![{title}](report_files/{_safe(name)}.png)\n")
    parts.append('<div id="image-status" data-total="" data-loaded="" data-broken="">images: status not yet known</div>')
    parts.append("</body></html>")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
    return out / "report.html"


def _figure(name: str, title: str, png: bytes) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{html.escape(name)}"><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
