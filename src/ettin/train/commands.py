"""CLI: ``ettin train``, ``ettin pair`` and ``ettin batches``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ettin.errors import EttinError


def register(app: typer.Typer) -> None:
    _register_train(app)
    register_convert(app)


def _register_train(app: typer.Typer) -> None:
    @app.command()
    def train(
        recipe: Path = typer.Argument(..., help="Recipe YAML (one stage, or 'stages: [...]')."),
        out: Path = typer.Option(..., "--out", help="Run directory; resumes from its last checkpoint."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field: dotted.key=value (repeatable)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this global step (checkpointing there)."),
        kind: Optional[str] = typer.Option(None, "--kind", help="Override model.kind: encoder or decoder."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        plan: bool = typer.Option(False, "--plan", help="Print each stage's steps and tokens per step, then exit."),
    ):
        """Train one model (or resume it). Works under torchrun for DDP/FSDP2."""
        from ettin.train.trainer import train as run_train

        if plan:
            return _print_plan(recipe, set_)
        if kind is not None and kind not in ("encoder", "decoder"):
            raise EttinError(f"--kind must be 'encoder' or 'decoder', got '{kind}'")
        _check_max_steps(max_steps)
        res = run_train(recipe, out, overrides=set_, max_steps=max_steps, progress=not no_progress, kind=kind)
        _summary(res)

    @app.command()
    def pair(
        recipe: Path = typer.Argument(..., help="Recipe YAML; model.kind is ignored."),
        out: Path = typer.Option(..., "--out", help="Run directory: OUT/encoder and OUT/decoder."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field: dotted.key=value (repeatable)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this global step (checkpointing there)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        plan: bool = typer.Option(False, "--plan", help="Print each stage's steps and tokens per step, then exit."),
    ):
        """Train an encoder (MLM) and a decoder (CLM) in lockstep on identical batches."""
        from ettin.train.trainer import train as run_train

        if plan:
            return _print_plan(recipe, set_)
        _check_max_steps(max_steps)
        res = run_train(recipe, out, overrides=set_, max_steps=max_steps, progress=not no_progress, pair=True)
        _summary(res)

    @app.command()
    def batches(
        run: Path = typer.Argument(..., help="Run directory (single or pair)."),
        step: Optional[int] = typer.Option(None, "--step", help="Global step (1-based)."),
        decode: bool = typer.Option(False, "--decode", help="Print the rows as text."),
        as_json: bool = typer.Option(False, "--json", help="Print {step, input_ids, batch_hash} as JSON."),
        export: Optional[Path] = typer.Option(None, "--export", help="Write the whole batch order to a Parquet file."),
    ):
        """Exactly the tokens of global batch N of a run, recomputed without training."""
        from ettin.train.trainer import batch_at

        if export is not None:
            from ettin.train.batch_order import export_order

            n = export_order(run, export)
            typer.echo(f"wrote {export} ({n} rows)")
            return
        if step is None:
            raise EttinError("give --step N (or --export FILE.parquet)")
        b = batch_at(run, step)
        ids = b["input_ids"]
        if as_json:
            typer.echo(json.dumps({"step": step, "stage": b["stage"], "input_ids": ids.tolist(), "batch_hash": b["batch_hash"]}))
            return
        typer.echo(f"step {step} ({b['stage']}): {ids.shape[0]} rows x {ids.shape[1]} tokens, first row {b['start_row']}, batch_hash {b['batch_hash']}")
        if decode:
            from ettin.data.tokenizer import load_tokenizer

            tok = load_tokenizer(b["mix"].tokenizer_dir)
            for i, row in enumerate(ids.tolist()):
                typer.echo(f"--- row {i}")
                typer.echo(tok.decode(row, skip_special_tokens=False))


def _check_max_steps(max_steps) -> None:
    if max_steps is not None:
        from ettin.validate import MAX_TOKENS, check_int

        check_int("--max-steps", max_steps, 1, MAX_TOKENS)


def _print_plan(recipe: Path, overrides) -> None:
    """Steps and tokens per step of each stage (``tokens_per_sample: auto`` measured on the data)."""
    from ettin.train import budget
    from ettin.train.recipe import load_recipe
    from ettin.train.trainer import open_mixture

    stages = budget.resolve_samples(load_recipe(recipe, overrides), open_mixture)
    for line in budget.plan_lines(budget.plan_summary(stages)):
        typer.echo(line)


def _summary(res: dict) -> None:
    runs = ", ".join(res["runs"])
    state = "finished" if res["finished"] else "stopped"
    losses = ""
    if res.get("last"):
        losses = " | " + ", ".join(f"{k} loss {v['loss']:.4f}" for k, v in res["last"].items())
    typer.echo(f"{state} at step {res['steps']} (resumed from {res['resumed_from']}): {runs}{losses}")


def register_convert(app: typer.Typer) -> None:
    @app.command()
    def convert(
        checkpoint: Path = typer.Argument(..., help="A checkpoint, a run directory (its last checkpoint), a Hugging Face directory or a Hub id (ORG/NAME)."),
        objective: str = typer.Option(..., "--objective", help="mntp (decoder -> encoder) or clm (encoder -> decoder)."),
        recipe: Path = typer.Option(..., "--recipe", help="Recipe YAML (e.g. recipes/ettin-150m/cross-objective.yaml)."),
        out: Path = typer.Option(..., "--out", help="Run directory of the converted model."),
        force: bool = typer.Option(False, "--force", help="Allow continuing with the objective the model already has."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field: dotted.key=value."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this global step (checkpointing there)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ):
        """Cross-objective continued training: weights only, attention direction switched, fresh schedule."""
        from ettin.convert.objective import convert as run_convert

        _check_max_steps(max_steps)
        res = run_convert(checkpoint, objective, recipe, out, force=force, overrides=set_, max_steps=max_steps, progress=not no_progress)
        _summary(res)
