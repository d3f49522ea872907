"""`ettin report`: discovery of runs, exact numbers in the CSV, tables, and images that load in a browser."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ettin.errors import EttinError
from ettin.report.report import winogender_groups, write_report
from ettin.report.runs import discover_runs

# -- fake runs -------------------------------------------------------------------------------------

TASKS = ("arc_easy", "wikitext2", "eval")  # trajectories: eval.jsonl tasks + the in-training {"type": "eval"} line (+ winogender)


def _steps(kind: str, objective: str, n: int, seed: float, stage_split: int | None = None) -> list[dict]:
    rows = []
    tokens = 0
    for i in range(1, n + 1):
        bs = 4 if i <= 3 else 8
        seq = 64 if (stage_split is None or i <= stage_split) else 128
        tokens += bs * seq
        rows.append({
            "step": i, "tokens": tokens,
            "loss": round(10.0 - seed - 0.37 * i + 0.01 * (i % 3), 6),
            "lr": 1e-3 * min(1.0, i / 4) if i < n else 3.3e-4,
            "batch_size": bs, "seq_len": seq,
            "mask_rate": (0.3 if kind == "encoder" else 0.0) if i <= 8 else 0.15 * (kind == "encoder"),
            "grad_norm": 1.5 / i + seed, "tokens_per_s": 1000.0 + 17 * i,
            "mfu": None if i % 2 else 0.125 * i / n,
            "batch_hash": f"h{i:04d}", "stage": "stage1" if stage_split is None or i <= stage_split else "stage2",
            "kind": kind, "objective": objective,
        })
    return rows


def _write_jsonl(path: Path, rows: list[dict], trailing: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + trailing)


def _ckpt(run: Path, step: int, tokens: int, causal: bool, objective: str, origin: str) -> None:
    d = run / "checkpoints" / f"{step:08d}"  # zero-padded, as the trainer names them
    d.mkdir(parents=True)
    (d / "ettin.json").write_text(json.dumps({
        "format": "ettin-checkpoint", "version": 1,
        "model": {"layers": 1, "hidden": 8, "intermediate": 8, "heads": 2, "causal": causal, "objective": objective, "origin": origin},
        "meta": {"step": step, "tokens": tokens}}))


def _evals(run: Path, kind: str, objective: str, origin: str, steps: list[dict], at: list[int], base: float) -> list[dict]:
    recs = []
    by_step = {s["step"]: s for s in steps}
    for j, st in enumerate(at):
        res = {
            "arc_easy": {"acc": round(base + 0.01 * j, 4), "acc_norm": round(base + 0.02 * j, 4), "n": 570},
            "wikitext2": {"perplexity": 900.5 - 100 * j - 10 * base, "bits_per_byte": 3.25 - 0.1 * j, "tokens": 24_000 + j, "n": 60},
        }
        if j == len(at) - 1:  # winogender only on the final checkpoint, named as `ettin eval` names them
            male = round(0.5 + base / 10, 4)
            res["winogender"] = {
                "male": male, "female": round(0.3 - base / 10, 4), "neutral": 0.2,
                "referent_occupation/male": 0.45, "referent_occupation/female": 0.35, "referent_occupation/neutral": 0.2,
                "occupation_male_majority/male": 0.6, "occupation_male_majority/female": 0.3, "occupation_male_majority/neutral": 0.1,
                "r_bls_female": 0.12, "n": 720,
            }
        recs.append({"model": str(run), "checkpoint": str(run / "checkpoints" / f"{st:08d}"), "step": st, "split": "validation",
                     "time": "2026-11-26T07:00:00+00:00",
                     "tokens": by_step[st]["tokens"], "kind": kind, "objective": objective, "origin": origin, "results": res})
        _ckpt(run, st, by_step[st]["tokens"], kind == "decoder", objective, origin)
    _write_jsonl(run / "eval.jsonl", recs)
    return recs


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """demo/pair/{encoder,decoder} and demo/convert/{mntp,clm}, like `ettin demo` writes."""
    root = tmp_path_factory.mktemp("r") / "demo"
    spec = {
        "pair/encoder": ("encoder", "mlm", "native", 12, 0.0, 6, 0.30),
        "pair/decoder": ("decoder", "clm", "native", 12, 0.5, 6, 0.35),
        "convert/mntp": ("encoder", "mntp", f"decoder->mntp from {root}/pair/decoder/checkpoints/12", 5, 1.0, None, 0.28),
        "convert/clm": ("decoder", "clm", f"encoder->clm from {root}/pair/encoder/checkpoints/12", 5, 1.5, None, 0.31),
    }
    out = {"root": root, "steps": {}, "evals": {}}
    for rel, (kind, obj, origin, n, seed, split, base) in spec.items():
        run = root / rel
        steps = _steps(kind, obj, n, seed, split)
        extra = [{"type": "eval", "step": 4, "tokens": steps[3]["tokens"], "val_loss": 7.25}]  # an in-training eval line
        _write_jsonl(run / "metrics.jsonl", steps[:4] + extra + steps[4:])
        (run / "recipe.yaml").write_text(f"kind: {kind}\nobjective: {obj}\n")
        at = [4, 8, 12] if n == 12 else [3, 5]
        out["evals"][rel] = _evals(run, kind, obj, origin, steps, at, base)
        out["steps"][rel] = steps
    return out


@pytest.fixture(scope="module")
def report(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report.html"
    assert write_report([demo["root"]], out) == out
    return out


# -- discovery -------------------------------------------------------------------------------------

def test_discovery_kinds_origins(demo):
    runs = {r.label: r for r in discover_runs([demo["root"]])}
    assert set(runs) == {"demo/pair/encoder", "demo/pair/decoder", "demo/convert/mntp", "demo/convert/clm"}
    assert runs["demo/pair/encoder"].kind == "encoder" and not runs["demo/pair/encoder"].converted
    assert runs["demo/convert/mntp"].kind == "encoder" and runs["demo/convert/mntp"].objective == "mntp"
    assert runs["demo/convert/mntp"].converted and runs["demo/convert/clm"].kind == "decoder"
    assert len(runs["demo/pair/decoder"].steps) == 12  # the {"type": "eval"} line is not a step
    # a pair dir alone gives its two sides; the same run given twice is reported once
    pair = discover_runs([demo["root"] / "pair", demo["root"] / "pair" / "encoder"])
    assert [r.label for r in pair] == ["pair/decoder", "pair/encoder"]


def test_no_runs_is_one_line_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(EttinError, match=r"empty: no runs found"):
        write_report([tmp_path / "empty"], tmp_path / "r.html")
    with pytest.raises(EttinError, match=r"nope: no such file"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    run = tmp_path / "run"
    _write_jsonl(run / "metrics.jsonl", _steps("encoder", "mlm", 3, 0.0), trailing='{"step": 4, "loss"\n{"step": 5}\n')
    with pytest.raises(EttinError, match=r"metrics\.jsonl:4: not valid JSON"):
        write_report([run], tmp_path / "r.html")
    # a truncated last line (writer mid-line) is skipped, not an error
    _write_jsonl(run / "metrics.jsonl", _steps("encoder", "mlm", 3, 0.0), trailing='{"step": 4, "lo')
    assert [s["step"] for s in discover_runs([run])[0].steps] == [1, 2, 3]


def test_cli_report(demo, tmp_path):
    from typer.testing import CliRunner

    from ettin.cli import app

    out = tmp_path / "sub" / "r.html"
    ok = CliRunner().invoke(app, ["report", str(demo["root"] / "pair"), str(demo["root"] / "convert"), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == f"wrote {out} (+ r.md, r.csv, r_files/)"
    assert len(re.findall(r"<img ", out.read_text())) == 6 and "<h2>Native vs converted" in out.read_text()
    env = dict(os.environ, MPLBACKEND="Agg")
    bad = subprocess.run([sys.executable, "-m", "ettin", "report", str(tmp_path), "--out", str(tmp_path / "r.html")],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no runs found" in bad.stderr and "Traceback" not in bad.stderr


# -- values ----------------------------------------------------------------------------------------

def _csv_rows(report: Path) -> list[dict]:
    with open(report.with_suffix(".csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_has_exactly_the_numbers(demo, report):
    rows = _csv_rows(report)
    expected = set()
    for rel, steps in demo["steps"].items():
        label = f"demo/{rel}"
        for s in steps:
            for k, v in s.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    expected.add((label, "train", str(s["step"]), str(s["tokens"]), "train", k, float(v)))
        expected.add((label, "metrics", "4", str(steps[3]["tokens"]), "eval", "val_loss", 7.25))
        for e in demo["evals"][rel]:
            for task, metrics in e["results"].items():
                for m, v in metrics.items():
                    expected.add((label, "eval", str(e["step"]), str(e["tokens"]), task, m, float(v)))
    got = [(r["run"], r["source"], r["step"], r["tokens"], r["task"], r["metric"], float(r["value"])) for r in rows]
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected  # float(repr) round-trips: exact equality
    enc = [r for r in rows if r["run"] == "demo/pair/encoder" and r["metric"] == "loss"]
    assert {r["kind"] for r in enc} == {"encoder"} and enc[0]["origin"] == "native"
    assert {r["stage"] for r in rows if r["run"] == "demo/pair/decoder" and r["metric"] == "seq_len"} == {"stage1", "stage2"}
    assert not any(r["metric"] in ("mfu",) and r["value"] in ("", "None") for r in rows)  # nulls are not numbers


def test_html_images_and_tables(demo, report):
    text = report.read_text()
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)
    # loss + schedules + one per trajectory task + winogender
    assert len(imgs) == 2 + len(TASKS) + 1
    for b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert w > 300 and h > 200
    assert "http://" not in text and "https://" not in text and "src=\"report_files" not in text  # self-contained
    files = sorted(p.name for p in (report.parent / "report_files").iterdir())
    assert files == sorted(["loss.png", "schedules.png", "task_arc_easy.png", "task_wikitext2.png", "task_eval.png", "winogender.png"])
    md = report.with_suffix(".md").read_text()
    assert md.count("](report_files/") == 6
    for f in files:
        assert f"(report_files/{f})" in md


def _table(text: str, title: str) -> list[list[str]]:
    """Rows of the HTML table after <h2>title</h2>, cells as exact repr where numeric."""
    i = text.index(f"<h2>{title}</h2>")
    body = text[i:text.index("</table>", i)]
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", body)[1:]:
        cells = re.findall(r'<td(?: class="num" title="([^"]*)")?>(.*?)</td>', tr)
        rows.append([t if t else v for t, v in cells])
    return rows


def test_native_vs_converted_table(demo, report):
    text = report.read_text()
    rows = _table(text, "Native vs converted (final checkpoints)")
    final = {rel: ev[-1]["results"] for rel, ev in demo["evals"].items()}
    by = {(r[0], r[3], r[4]): r for r in rows}
    # the converted encoder (MNTP) is compared with the native encoder, the converted decoder with the native decoder
    r = by[("demo/convert/mntp", "arc_easy", "acc")]
    assert r[2] == "demo/pair/encoder"
    assert (int(r[5]), int(r[6])) == (demo["steps"]["pair/encoder"][11]["tokens"], demo["steps"]["convert/mntp"][4]["tokens"])
    assert (int(r[7]), int(r[8])) == (570, 570)  # the n behind each side's score
    assert float(r[9]) == final["pair/encoder"]["arc_easy"]["acc"] and float(r[10]) == final["convert/mntp"]["arc_easy"]["acc"]
    assert math.isclose(float(r[11]), final["convert/mntp"]["arc_easy"]["acc"] - final["pair/encoder"]["arc_easy"]["acc"])
    r = by[("demo/convert/clm", "wikitext2", "perplexity")]
    assert r[2] == "demo/pair/decoder" and float(r[10]) == final["convert/clm"]["wikitext2"]["perplexity"]
    # the in-training eval line (only at step 4) still counts as that task's final value
    assert float(by[("demo/convert/clm", "eval", "val_loss")][9]) == 7.25
    assert ("demo/convert/clm", "arc_easy", "n") not in by  # counts are not scores
    assert ("demo/convert/clm", "wikitext2", "tokens") not in by
    conv = [k for k in by if k[0] == "demo/convert/clm"]
    assert len(conv) == 2 + 2 + 10 + 1  # arc (acc, acc_norm), wikitext (2), winogender (9 shares + r), val_loss


def test_final_scores_show_n_and_no_counts_as_metrics(demo, report):
    rows = _table(report.read_text(), "Final checkpoint scores")
    by = {(r[0], r[1]): r[2:] for r in rows}
    assert [float(x) for x in by[("arc_easy", "n (examples)")]] == [570.0] * 4
    assert [float(x) for x in by[("wikitext2", "n (examples)")]] == [60.0] * 4
    assert ("wikitext2", "tokens") not in by and ("wikitext2", "n") not in by
    assert [k[1] for k in by if k[0] == "wikitext2"] == ["n (examples)", "perplexity", "bits_per_byte"]


def test_every_panel_has_a_legend_of_its_runs(demo):
    from ettin.report import plots
    from ettin.report.report import _task_metrics

    runs = discover_runs([demo["root"]])
    styles = plots.run_styles(runs)
    # a --limit run among full ones: its n differs, and the legend says so
    limited = runs[1].evals[-1].results["arc_easy"]
    limited["n"] = 10
    fig = plots.task_figure("arc_easy", _task_metrics(runs)["arc_easy"], runs, styles)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(labels) == 4, labels
        assert f"{runs[0].label} (n=570)" in labels and f"{runs[1].label} (n=10-570)" in labels
    fig = plots.schedule_figure(runs, styles)
    for ax in fig.axes:
        if ax.lines:
            assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) == len({ln.get_label() for ln in ax.lines})


def test_winogender(demo, report):
    rows = _table(report.read_text(), "Winogender pronoun shares (final checkpoint)")
    assert len(rows) == 4 * 3  # 4 runs x template sets; the correlation r_bls_female is not a share
    assert [r[3] for r in rows[:3]] == ["all", "referent_occupation", "occupation_male_majority"]
    enc = {r[3]: r for r in rows if r[0] == "demo/pair/encoder"}
    assert tuple(float(x) for x in enc["all"][4:7]) == (0.53, 0.27, 0.2)
    assert tuple(float(x) for x in enc["occupation_male_majority"][4:8]) == (0.6, 0.3, 0.1, 720.0)
    # robust to the metric names the eval task picks
    assert winogender_groups({"male": 0.5, "female": 0.25, "neutral": 0.25, "n": 720}) == {"all": {"male": 0.5, "female": 0.25, "neutral": 0.25}}
    assert winogender_groups({"male_share": 0.6, "female_share": 0.4, "someone.male": 0.1, "someone.female": 0.8,
                              "someone.neutral": 0.1, "pct_female_r": 0.3}) == {
        "all": {"male": 0.6, "female": 0.4}, "someone": {"male": 0.1, "female": 0.8, "neutral": 0.1}}
    assert winogender_groups({"gotchaMale": 0.7, "gotchaFemale": 0.3}) == {"gotcha": {"male": 0.7, "female": 0.3}}
    assert winogender_groups({"occupation_female_majority/male": 0.2, "occupation_female_majority/female": 0.7,
                              "occupation_female_majority/neutral": 0.1}) == {
        "occupation_female_majority": {"male": 0.2, "female": 0.7, "neutral": 0.1}}


def test_single_run_without_evals(tmp_path):
    run = tmp_path / "solo"
    _write_jsonl(run / "metrics.jsonl", _steps("decoder", "clm", 60, 0.0))
    out = write_report([run], tmp_path / "out" / "r.html")
    text = out.read_text()
    assert len(re.findall(r"<img ", text)) == 2 and "Native vs converted" not in text
    assert (tmp_path / "out" / "r.md").is_file() and (tmp_path / "out" / "r_files" / "loss.png").is_file()
    rows = _csv_rows(out)
    # 7 numeric fields on every step, plus mfu on the 30 steps where it is not null
    assert len(rows) == 60 * 7 + 30
    assert sum(float(r["value"]) for r in rows if r["metric"] == "batch_size") == 3 * 4 + 57 * 8


# -- browser ---------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dump_dom(html_path: Path, profile: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", html_path.resolve().as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _status(dom: str) -> dict:
    m = re.search(r'<div id="image-status"([^>]*)>([^<]*)</div>', dom)
    assert m, dom[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(1)))
    return {"total": int(attrs["total"]), "loaded": int(attrs["loaded"]), "broken": int(attrs["broken"]), "text": m.group(2)}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_images_load_in_headless_chromium(report, tmp_path):
    # negative control in the same browser run: a copy with one image's bytes corrupted must be caught
    broken = tmp_path / "broken.html"
    text = report.read_text()
    first = re.search(r'src="data:image/png;base64,([^"]{40})', text).group(1)
    broken.write_text(text.replace(first, "AAAA" + first[4:], 1))
    dom = _dump_dom(report, tmp_path / "profile")
    st = _status(dom)
    assert st == {"total": 6, "loaded": 6, "broken": 0, "text": "images: 6 of 6 loaded"}
    assert dom.count('data-loaded="yes"') == 6  # every <img> marked
    bad = _status(_dump_dom(broken, tmp_path / "profile2"))
    assert bad["total"] == 6 and bad["broken"] == 1 and bad["loaded"] == 5
