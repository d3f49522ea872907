"""``write_report``: one self-contained HTML file, a Markdown twin and a CSV of every number.

    report.html        plots embedded as base64 PNG, tables, no external resources; an inline
                       script marks each image's load status (used by the browser test)
    report.md          the same tables, images from report_files/
    report_files/*.png the figures
    report.csv         one row per run / step (or evaluated checkpoint) / metric

Every file is written atomically (``ettin.fsutil``); the HTML last, so its presence means the
rest is there.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import EttinError
from ettin.fsutil import atomic_dir, atomic_write_text
from ettin.report import plots
from ettin.report.runs import Run, discover_runs, is_number, pick_native

CSV_COLUMNS = ("run", "kind", "objective", "origin", "source", "step", "tokens", "stage", "checkpoint", "task", "metric", "value")
_FILLER = {"share", "shares", "frac", "fraction", "pct", "percent", "rate", "prop", "proportion", "p"}
MAX_METRICS_PER_TASK = 6
# How much was scored, not how well: shown as counts (n beside every score), never as a metric.
# Settings and sizes a result reports beside its scores (GLUE seeds/train_n, retrieval pairs) are not scores either.
COUNT_KEYS = frozenset({"n", "tokens", "documents", "docs", "words", "bytes", "chars", "examples", "queries", "limit",
                        "seeds", "train_n", "train_pairs", "hard_negatives", "finetuned", "lr"})


def is_count(name: str) -> bool:
    return name in COUNT_KEYS or name.startswith(("n_", "num_")) or name.endswith(("_count", "_tokens"))


def n_of(results: dict, task: str):
    """The number of examples behind a task's scores (None when the record does not say)."""
    v = (results.get(task) or {}).get("n")
    return v if is_number(v) else None


@dataclass
class Image:
    name: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]
    note: str = ""


# -- numbers -----------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if abs(v) >= 10_000 and abs(v) < 1e12:
            return f"{v:,.0f}"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e12):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


_GENDER_WORD = re.compile(r"(?<![a-z])(female|male|neutral)(?![a-z])")
_GENDER_ANY = re.compile(r"female|male|neutral")
_SEP = r"[/._:\-\s]"


def winogender_groups(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{template set: {male, female, neutral: share}} from whatever metric names the task chose.

    The gender is the *last* "male"/"female"/"neutral" in a metric's name (as a word, else as a
    substring: "gotchaMale"); what is left of the name (minus edge words like "share") names the
    template set, "all" when nothing is left. So "referent_occupation/male",
    "occupation_male_majority/female", "male_share" and "someone.neutral" all work. Sets with
    fewer than two genders are not shares (e.g. "r_bls_female", a correlation) and are dropped.
    """
    groups: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        if key == "n" or not is_number(v):
            continue
        low = key.lower()
        hits = list(_GENDER_WORD.finditer(low)) or list(_GENDER_ANY.finditer(low))
        if not hits:
            continue
        m = hits[-1]
        gender = m.group(0)
        rest = key[: m.start()] + " " + key[m.end():]
        rest = re.sub(f"{_SEP}+", lambda t: t.group(0)[0] if t.group(0)[0] != " " else "/", rest.strip(" "))
        words = [w for w in re.split(_SEP, rest) if w]
        while words and words[0].lower() in _FILLER:
            words.pop(0)
        while words and words[-1].lower() in _FILLER:
            words.pop()
        if not words:
            group = "all"
        else:
            # keep the name as written between the first and last remaining word
            first = rest.find(words[0])
            last = rest.rfind(words[-1]) + len(words[-1])
            group = rest[first:last]
        groups.setdefault(group, {})[gender] = float(v)
    return {g: d for g, d in groups.items() if len(d) >= 2}


def _task_metrics(runs: list[Run]) -> dict[str, list[str]]:
    """Task -> its metrics (ordered as first seen), over every evaluation of every run."""
    out: dict[str, list[str]] = {}
    for r in runs:
        for e in r.evals:
            for task, metrics in e.results.items():
                lst = out.setdefault(task, [])
                for m in metrics:
                    if not is_count(m) and m not in lst:  # counts, not scores
                        lst.append(m)
    return out


def _is_winogender(task: str) -> bool:
    return "winogender" in task.lower()


# -- content -------------------------------------------------------------------------------------
def build_csv(runs: list[Run]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in runs:
        ident = [r.label, r.kind, r.objective, r.origin]
        for s in r.steps:
            for k, v in s.items():
                if k in ("step", "tokens") or not is_number(v):
                    continue
                w.writerow(ident + ["train", s["step"], s.get("tokens", ""), s.get("stage", ""), "", "train", k, v])
        for e in r.evals:
            for task, metrics in e.results.items():
                for m, v in metrics.items():
                    w.writerow(ident + [e.source, "" if e.step is None else e.step, "" if e.tokens is None else e.tokens,
                                        "", e.checkpoint, task, m, v])
    return buf.getvalue()


def build_tables(runs: list[Run]) -> list[Table]:
    tables = []
    rows = []
    for r in runs:
        last = r.final_step()
        rows.append([r.label, r.kind, r.objective, r.origin, len(r.steps), last["step"] if last else None,
                     last.get("tokens") if last else None, last.get("loss") if last else None, len(r.evals)])
    tables.append(Table("Runs", ["run", "kind", "objective", "origin", "steps", "last step", "tokens", "last loss", "evaluations"], rows))

    tm = _task_metrics(runs)
    evaluated = [r for r in runs if r.evals]
    finals = {r.label: r.final_results() for r in runs}

    def final(r: Run, task: str, metric: str):
        rec = finals[r.label].get(task)
        return rec.results[task].get(metric) if rec else None

    if evaluated:
        rows = []
        for task, metrics in tm.items():
            if metrics:
                rows.append([task, "n (examples)"] + [final(r, task, "n") for r in evaluated])
            for m in metrics:
                rows.append([task, m] + [final(r, task, m) for r in evaluated])
        tables.append(Table("Final checkpoint scores", ["task", "metric"] + [r.label for r in evaluated], rows,
                            "For each run and task, the latest checkpoint evaluated on that task; "
                            "'n' is how many examples its scores rest on (a --limit run shows its limit)."))

    conv_rows = []
    for c in (r for r in runs if r.converted):
        native = pick_native(c, runs)
        if native is None:
            conv_rows.append([c.label, c.origin, f"no native {c.kind} among the runs", "", "", None, None, None, None, None, None, None])
            continue
        cf, nf = finals[c.label], finals[native.label]
        common = [t for t in nf if t in cf]
        if not common:
            why = f"{c.label} has no evaluation" if not cf else f"{native.label} has no evaluation" if not nf else "no task in common"
            conv_rows.append([c.label, c.origin, native.label, "", f"({why})", None, None, None, None, None, None, None])
            continue
        for task in common:
            nrec, crec = nf[task], cf[task]
            for m, cv in crec.results[task].items():
                nv = nrec.results[task].get(m)
                if is_count(m) or nv is None or not is_number(cv) or not is_number(nv):
                    continue
                conv_rows.append([c.label, c.origin, native.label, task, m, nrec.tokens, crec.tokens,
                                  n_of(nrec.results, task), n_of(crec.results, task), nv, cv, cv - nv])
    if any(r.converted for r in runs):
        tables.append(Table("Native vs converted (final checkpoints)",
                            ["converted run", "origin", "native run", "task", "metric", "native tokens", "converted tokens",
                             "native n", "converted n", "native", "converted", "converted − native"],
                            conv_rows, "Each converted run against the native run of the same kind, both at their final evaluated checkpoint "
                                       "(converted tokens count the continued training only)."))

    wrows = []
    for r in evaluated:
        for task, rec in finals[r.label].items():
            if not _is_winogender(task):
                continue
            metrics = rec.results[task]
            for group, shares in winogender_groups(metrics).items():
                wrows.append([r.label, r.kind, task, group, shares.get("male"), shares.get("female"), shares.get("neutral"), metrics.get("n")])
    if wrows:
        tables.append(Table("Winogender pronoun shares (final checkpoint)",
                            ["run", "kind", "task", "template set", "male", "female", "neutral", "n"], wrows))
    return tables


def build_images(runs: list[Run]) -> list[Image]:
    from ettin.progress import progress

    tasks = [t for t, m in _task_metrics(runs).items() if m and not _is_winogender(t)]
    with progress(2 + len(tasks) + 1, "report: figures", "figures") as bar:
        return _build_images(runs, bar)


def _build_images(runs: list[Run], bar) -> list[Image]:
    styles = plots.run_styles(runs)
    images = [
        Image("loss", "Training loss", plots.loss_plot(runs, styles),
              "Encoder vs decoder training loss against tokens seen (converted runs dashed; thick line smoothed)."),
        Image("schedules", "Schedules", plots.schedule_plot(runs, styles),
              "Learning rate, batch size, mask rate and sequence length against tokens "
              "(identical schedules overlap; earlier runs are drawn wider)."),
    ]
    bar.advance(2, last="training")
    for task, metrics in _task_metrics(runs).items():
        if _is_winogender(task) or not metrics:
            continue
        shown = metrics[:MAX_METRICS_PER_TASK]
        cap = f"{task} against tokens, every run on one axis."
        if len(metrics) > len(shown):
            cap += f" ({len(metrics) - len(shown)} more metrics in the CSV.)"
        images.append(Image(f"task_{_slug(task)}", f"Task: {task}", plots.task_plot(task, shown, runs, styles), cap))
        bar.advance(1, last=task)
    wino = []
    for r in runs:
        for task, rec in r.final_results().items():
            if _is_winogender(task):
                groups = winogender_groups(rec.results[task])
                if groups:
                    name = r.label if task == "winogender" else f"{r.label} [{task}]"
                    wino.append((f"{name} ({r.kind} {r.objective})", groups))
    if wino:
        images.append(Image("winogender", "Winogender", plots.winogender_plot(wino),
                            "Share of male / female / neutral pronoun predictions per template set."))
    bar.advance(1, last="winogender")
    return images


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "task"


# -- rendering -----------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{font-size:.85em;color:#555}.tw{overflow-x:auto}#image-status{font-size:.8em;color:#777;margin-top:2em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', good ? 'yes' : 'no');
    if (good) { ok++; } else { bad++; }
  }
  var s = document.getElementById('image-status');
  s.setAttribute('data-total', String(imgs.length));
  s.setAttribute('data-loaded', String(ok));
  s.setAttribute('data-broken', String(bad));
  s.textContent = 'images: ' + ok + ' of ' + imgs.length + ' loaded' + (bad ? ', ' + bad + ' broken' : '');
});
"""


def _html_cell(v) -> str:
    if is_number(v):
        return f'<td class="num" title="{html.escape(repr(v))}">{html.escape(fmt(v))}</td>'
    return f"<td>{html.escape(fmt(v))}</td>"


def render_html(runs: list[Run], tables: list[Table], images: list[Image], csv_name: str = "report.csv") -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>ettin report</title>", f"<style>{_CSS}</style>", f"<script>{_SCRIPT}</script>", "</head><body>",
             "<h1>ettin report</h1>",
             (f'<p class="note">{len(runs)} run(s): {html.escape(", ".join(r.label for r in runs))}. '
              f"Numbers in full precision in {html.escape(csv_name)}; hover a cell for its exact value.</p>")]
    by_name = {im.name: im for im in images}
    order = ["loss", "schedules"]
    for t in tables[:1]:
        parts.append(_html_table(t))
    parts.append("<h2>Training</h2>")
    for name in order:
        parts.append(_html_figure(by_name[name]))
    task_imgs = [im for im in images if im.name.startswith("task_")]
    if task_imgs:
        parts.append("<h2>Evaluation trajectories</h2>")
        parts.extend(_html_figure(im) for im in task_imgs)
    for t in tables[1:]:
        parts.append(_html_table(t))
        if t.title.startswith("Winogender") and "winogender" in by_name:
            parts.append(_html_figure(by_name["winogender"]))
    parts.append('<div id="image-status" data-total="" data-loaded="" data-broken="">images: status not yet known (scripts disabled?)</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(_html_cell(v) for v in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    if not t.rows:
        body = f'<tr><td colspan="{len(t.headers)}">(nothing to compare)</td></tr>'
    return (f'<h2>{html.escape(t.title)}</h2>{note}<div class="tw"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _html_figure(im: Image) -> str:
    b64 = base64.b64encode(im.png).decode("ascii")
    return (f'<figure id="fig-{html.escape(im.name)}"><img alt="{html.escape(im.title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(im.caption)}</figcaption></figure>")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = [f"## {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in t.headers) + " |")
    lines.append("|" + "|".join("---:" if any(is_number(r[i]) for r in t.rows) else "---" for i in range(len(t.headers))) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(_md_escape(fmt(v)) for v in row) + " |")
    if not t.rows:
        lines.append("| " + " | ".join(["(nothing to compare)"] + [""] * (len(t.headers) - 1)) + " |")
    return "\n".join(lines) + "\n"


def render_md(runs: list[Run], tables: list[Table], images: list[Image], files_dir: str, csv_name: str) -> str:
    def img(im: Image) -> str:
        return f"![{im.title}]({files_dir}/{im.name}.png)\n\n*{im.caption}*\n"

    by_name = {im.name: im for im in images}
    parts = ["# ettin report", "", f"{len(runs)} run(s): {', '.join(r.label for r in runs)}. All numbers: `{csv_name}`.", ""]
    parts.append(_md_table(tables[0]))
    parts += ["## Training", "", img(by_name["loss"]), img(by_name["schedules"])]
    task_imgs = [im for im in images if im.name.startswith("task_")]
    if task_imgs:
        parts += ["## Evaluation trajectories", ""] + [img(im) for im in task_imgs]
    for t in tables[1:]:
        parts.append(_md_table(t))
        if t.title.startswith("Winogender") and "winogender" in by_name:
            parts.append(img(by_name["winogender"]))
    return "\n".join(parts)


# -- entry point -----------------------------------------------------------------------------------
def report_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {"html": out, "md": out.with_suffix(".md"), "csv": out.with_suffix(".csv"),
            "files": out.parent / f"{out.stem}_files"}


def _head(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _ours(key: str, path: Path) -> bool:
    """Whether an existing report output was written by ``ettin report`` (so it may be replaced)."""
    if key == "files":
        try:
            names = [p.name for p in path.iterdir()]
        except OSError:
            return False
        return all(n.endswith(".png") for n in names)  # the report writes only its plots there
    head = _head(path)
    if key == "html":
        return head.startswith("<!DOCTYPE html>") and "<title>ettin report</title>" in head
    if key == "md":
        return head.startswith("# ettin report")
    return head.split("\n", 1)[0] == ",".join(CSV_COLUMNS)


def check_report_out(out: Path, force: bool) -> None:
    """Nothing the report did not write is replaced without --force; never a directory for a file."""
    from ettin.safety import check_parent

    check_parent(out)
    for key, p in report_paths(out).items():
        if not p.exists() and not p.is_symlink():
            continue
        want_dir = key == "files"
        if p.is_dir() != want_dir or p.is_symlink():
            raise EttinError(f"{p}: exists and is {'a directory' if p.is_dir() else 'not a directory'}; the report writes {'a directory' if want_dir else 'a file'} there (remove it or choose another --out)")
        if not force and not _ours(key, p):
            raise EttinError(f"{p}: exists and was not written by 'ettin report'; pass --force to replace it")


def write_report(runs: list[Path], out: Path, *, force: bool = False) -> Path:
    """Report on every run under ``runs`` into ``out`` (HTML) plus ``.md``, ``.csv`` and ``_files/``."""
    out = Path(out)
    if out.is_dir():
        raise EttinError(f"{out}: is a directory; --out takes the HTML file to write (e.g. {out / 'report.html'})")
    if out.suffix.lower() in (".md", ".csv"):
        raise EttinError(f"{out}: --out names the HTML file; report.md and report.csv are written beside it")
    check_report_out(out, force)
    found = discover_runs([Path(p) for p in runs])
    tables = build_tables(found)
    images = build_images(found)
    paths = report_paths(out)
    with atomic_dir(paths["files"]) as tmp:
        for im in images:
            (tmp / f"{im.name}.png").write_bytes(im.png)
    atomic_write_text(paths["csv"], build_csv(found))
    atomic_write_text(paths["md"], render_md(found, tables, images, paths["files"].name, paths["csv"].name))
    atomic_write_text(paths["html"], render_html(found, tables, images, paths["csv"].name))
    _share(paths)
    return out


def _share(paths: dict[str, Path]) -> None:
    """Reports are for reading: ordinary permissions (the atomic temp files are private, 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for key in ("html", "md", "csv"):
        os.chmod(paths[key], 0o666 & ~umask)
    os.chmod(paths["files"], 0o777 & ~umask)
    for f in paths["files"].iterdir():
        os.chmod(f, 0o666 & ~umask)
