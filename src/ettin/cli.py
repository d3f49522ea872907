"""The ``ettin`` command. Each concern registers its own commands; errors become one line.

Command modules (``ettin.<concern>.commands``) expose ``register(app)``. Anything raised as
:class:`ettin.errors.EttinError` is printed as ``error: ...`` on stderr with exit code 1.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import typer

from ettin.errors import EttinError

app = typer.Typer(
    name="ettin",
    help="Train encoders and decoders as matched pairs, convert, inspect and evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def sizes(as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")):
    """The model size presets with their exact parameter counts."""
    from ettin.config import sizes_table

    rows = sizes_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ettin sizes (vocabulary 50,368)")
    for col in ("name", "layers", "hidden", "intermediate", "heads", "params", "peak_lr"):
        t.add_column(col, justify="right" if col != "name" else "left")
    for r in rows:
        t.add_row(r["name"], str(r["layers"]), str(r["hidden"]), str(r["intermediate"]), str(r["heads"]), f"{r['params']:,}", f"{r['peak_lr']:g}")
    Console().print(t)


@app.command()
def init(
    size: str = typer.Option(..., "--size", help="Preset name (see 'ettin sizes')."),
    kind: str = typer.Option(..., "--kind", help="encoder or decoder."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="Vocabulary size (default 50,368; small values use ids 0-3 as specials)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer directory to store with the checkpoint (sets vocabulary and special ids)."),
    seed: int = typer.Option(0, "--seed"),
):
    """Write a randomly initialised checkpoint."""
    import torch

    from ettin.checkpoint import save_checkpoint
    from ettin.config import MODERNBERT_VOCAB, check_size, preset, small_vocab_specials
    from ettin.model import Transformer

    check_size(size)
    if kind not in ("encoder", "decoder"):
        raise EttinError(f"--kind must be 'encoder' or 'decoder', got '{kind}'")
    overrides = {}
    if tokenizer is not None:
        from ettin.data.tokenizer import model_overrides

        overrides = model_overrides(tokenizer)
    if vocab_size is not None:
        if overrides and vocab_size < overrides["vocab_size"]:
            raise EttinError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {overrides['vocab_size']}")
        if not overrides:
            overrides = {"vocab_size": vocab_size} if vocab_size == MODERNBERT_VOCAB else small_vocab_specials(vocab_size)
        overrides["vocab_size"] = vocab_size
    cfg = preset(size, causal=(kind == "decoder"), **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    save_checkpoint(out, model, meta={"step": 0, "tokens": 0, "seed": seed}, tokenizer_dir=tokenizer)
    typer.echo(f"wrote {out} ({cfg.kind}, {size}, {model.num_params():,} parameters)")


_COMMAND_MODULES = (
    "ettin.convert.commands",
    "ettin.data.commands",
    "ettin.train.commands",
    "ettin.eval.commands",
    "ettin.report.commands",
    "ettin.demo",
    "ettin.study.commands",
)


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except EttinError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
