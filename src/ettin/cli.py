"""The ``ettin`` command. Each concern registers its own commands; errors become one line.

Command modules (``ettin.<concern>.commands``) expose ``register(app)``. Anything raised as
:class:`ettin.errors.EttinError` is printed as ``error: ...`` on stderr with exit code 1.
"""

from __future__ import annotations

import functools
import importlib
import inspect
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
    seed: int = typer.Option(0, "--seed", help="Random seed of the initialisation."),
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
    _add_quiet(app)


# Commands that run long enough to show progress; each gets --quiet/-q (ettin.progress).
_LONG_COMMANDS = {"train", "pair", "convert", "export", "import", "eval", "embed", "report", "demo", "study", "prepare"}


def _add_quiet(typer_app: typer.Typer) -> None:
    """Give every long command a ``--quiet/-q`` flag that silences ettin.progress (bars, status
    lines), without each command module declaring it; a command's own ``quiet`` also sets it."""
    from ettin.progress import set_quiet

    for info in typer_app.registered_commands:
        cb = info.callback
        name = info.name or (cb.__name__.replace("_", "-") if cb else "")
        if cb is None or getattr(cb, "_ettin_quiet", False) or (name not in _LONG_COMMANDS and not name.endswith("train")):
            continue
        sig = inspect.signature(cb)
        own = "quiet" in sig.parameters

        def wrapped(*args, _cb=cb, _own=own, **kwargs):
            q = kwargs.get("quiet") if _own else kwargs.pop("quiet", False)
            set_quiet(True if q else None)
            return _cb(*args, **kwargs)

        functools.update_wrapper(wrapped, cb)
        wrapped._ettin_quiet = True
        if not own:
            opt = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines (results and errors still print).")
            params = list(sig.parameters.values()) + [inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=bool)]
            wrapped.__signature__ = sig.replace(parameters=params)
            wrapped.__annotations__ = {**getattr(cb, "__annotations__", {}), "quiet": bool}
        info.callback = wrapped
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _add_quiet(group.typer_instance)


def _no_bool_metavar() -> None:
    """typer prints ``<bool>`` after every flag in --help; a flag takes no value, so show none."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer always has it
        return
    if getattr(TyperOption.display_type_rich, "_ettin", False):
        return
    orig = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return orig(self, ctx)

    display_type_rich._ettin = True
    TyperOption.display_type_rich = display_type_rich


_no_bool_metavar()
_register_all()


def main() -> None:
    from ettin.progress import wide_output

    wide_output()
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
