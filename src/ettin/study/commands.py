"""``ettin study``: train pairs at several sizes, convert, export, evaluate everything, report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ettin.errors import EttinError


def _parse_tokens(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        v = float(text.replace("_", ""))
    except ValueError:
        raise EttinError(f"--tokens must be a number (e.g. 2e6), got '{text}'") from None
    if v <= 0:
        raise EttinError(f"--tokens must be positive, got '{text}'")
    return v


def register(app: typer.Typer) -> None:
    @app.command()
    def study(
        sizes: Optional[str] = typer.Option(None, "--sizes", help="Comma-separated sizes, e.g. micro,tiny or 17m,32m,68m (default: the preset's)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Study directory (rerun the same command to continue)."),
        recipe_dir: Optional[Path] = typer.Option(None, "--recipe-dir", help="stage1-3.yaml + cross-objective.yaml (or ettin-<size>/ subdirectories)."),
        tokens: Optional[str] = typer.Option(None, "--tokens", help="Pair pre-training tokens per size (stages 1-3; all budgets scale)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data in the ../shared/data layout (its pretrain/ is the training corpus)."),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="Tasks or groups (default: all the data holds)."),
        preset: str = typer.Option("cpu", "--preset", help="cpu (two tiny sizes, examples capped) or gpu (17m, 32m, 68m)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Recipe override, e.g. stage3.optim.lr=1e-3 (one stage) or optim.lr=1e-3 (every stage); repeatable."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Examples per task (overrides the preset)."),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="Fine-tuning seeds, e.g. 0,1,2."),
        device: Optional[str] = typer.Option(None, "--device", help="Evaluation device (cpu or cuda)."),
        n_boot: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates per interval."),
        status: Optional[Path] = typer.Option(None, "--status", help="Print the state of study DIR and exit (runs nothing)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No per-unit progress bars."),
    ):
        """The paper's comparison: pairs at several sizes, conversions, every checkpoint evaluated, with intervals."""
        from ettin.study.plan import make_config
        from ettin.study.run import run_study
        from ettin.study.run import status as show_status

        if status is not None:
            show_status(status, echo=typer.echo)
            return
        if out is None:
            raise EttinError("give --out DIR (the study directory) or --status DIR")
        if n_boot < 100:
            raise EttinError(f"--bootstrap must be at least 100, got {n_boot}")
        ev = {}
        if limit is not None:
            ev["limit"] = limit
        if seeds is not None:
            from ettin.eval.commands import _parse_list

            ev["seeds"] = _parse_list(seeds, int, "--seeds")
        if device is not None:
            ev["device"] = device
        size_list = [s.strip() for s in sizes.split(",") if s.strip()] if sizes is not None else None
        if sizes is not None and not size_list:
            raise EttinError("--sizes is empty: name at least one size (see 'ettin sizes')")
        cfg = make_config(sizes=size_list, out=out, preset=preset, recipe_dir=recipe_dir, tokens=_parse_tokens(tokens),
                          data=data, tasks=tasks, sets=tuple(set_ or ()), eval_overrides=ev, n_boot=n_boot)
        s = run_study(cfg, progress=not no_progress, echo=typer.echo)
        typer.echo(f"study: {Path(cfg.out) / 'study.json'}  report: {Path(cfg.out) / 'report.html'}  "
                   f"({s.get('seconds_this_call')} s this call)")
