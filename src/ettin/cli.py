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
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out that is not an ettin checkpoint."),
):
    """Write a randomly initialised checkpoint."""
    import torch

    from ettin.checkpoint import save_checkpoint
    from ettin.config import MODERNBERT_VOCAB, check_size, preset, small_vocab_specials
    from ettin.model import Transformer

    from ettin.checkpoint import is_checkpoint
    from ettin.safety import check_out
    from ettin.validate import check_int

    check_size(size)
    if kind not in ("encoder", "decoder"):
        raise EttinError(f"--kind must be 'encoder' or 'decoder', got '{kind}'")
    check_int("--seed", seed, 0, 2**63 - 1)
    if vocab_size is not None:
        check_int("--vocab-size", vocab_size, 8, 1 << 22)
    check_out(out, force=force, ours=is_checkpoint(out), what="checkpoint")
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


def _os_error(e: OSError) -> str:
    """An operating-system error as one line: what failed, on which path."""
    import errno

    what = e.strerror or type(e).__name__
    if e.errno == errno.ENOSPC:
        what = "no space left on the device (disk full)"
    where = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{where}: {what}" if where is not None else what


def _one_line(msg: str) -> str:
    lines = [ln for ln in str(msg).splitlines() if ln.strip()]
    return lines[0] if lines else str(msg)


def _flush_stdout() -> str | None:
    """Flush stdout now (e.g. onto /dev/full) so a failure is our one line, not Python's at exit."""
    try:
        sys.stdout.flush()
    except OSError as e:
        import os

        try:  # nothing more can reach stdout; point it at /dev/null so the exit flush is silent
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return "" if isinstance(e, BrokenPipeError) else f"stdout: {_os_error(e)}"  # a closed pipe (| head): silent
    except ValueError:
        return None
    return None


def main() -> None:
    """Run the CLI; every failure is one line on stderr (ETTIN_DEBUG=1 keeps tracebacks of bugs)."""
    import os

    from ettin.progress import wide_output

    wide_output()  # off a terminal, tables and help are not wrapped at 80 columns

    debug = os.environ.get("ETTIN_DEBUG") not in (None, "", "0")
    code: int | str | None = 0
    msg = None
    try:  # typer >= 0.2x vendors click
        from typer import _click as click
    except ImportError:  # pragma: no cover
        import click

    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())
    abort = getattr(click.exceptions, "Abort", None) or getattr(importlib.import_module("typer.exceptions"), "Abort", ())
    try:
        rv = app(standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as e:
        code = e.code
    except no_args_help:
        try:
            app()  # a bare group: its help, exactly as click prints it
        except SystemExit as e:
            code = e.code
    except click.exceptions.UsageError as e:  # a wrong flag or value: one line, not a usage panel
        path = e.ctx.command_path if e.ctx is not None else "ettin"
        msg, code = f"{path}: {_one_line(e.format_message())} (see '{path} --help')", e.exit_code
    except abort:
        msg, code = "aborted", 1
    except click.exceptions.ClickException as e:
        msg, code = _one_line(e.format_message()), e.exit_code
    except EttinError as e:
        msg, code = _one_line(e), 1
    except KeyboardInterrupt:
        msg, code = "interrupted", 130
    except BrokenPipeError:  # the reader went away (| head): nothing to tell it
        code = 1
        _flush_stdout()
    except OSError as e:
        msg, code = _os_error(e), 1
    except MemoryError:
        msg, code = "out of memory", 1
    except RecursionError:
        msg, code = "input nested too deeply (recursion limit reached)", 1
    except Exception as e:  # a bug: one line by default, the traceback with ETTIN_DEBUG=1
        if debug:
            raise
        if type(e).__name__ == "SafetensorError":  # safetensors' own I/O errors (Rust side)
            text = _one_line(e)
            msg, code = ("no space left on the device (disk full)" if "os error 28" in text else f"safetensors: {text}"), 1
        else:
            msg, code = f"internal error: {type(e).__name__}: {_one_line(e)} (set ETTIN_DEBUG=1 for the traceback, and please report it)", 1
    err = _flush_stdout()
    if msg is None and err is not None:
        msg, code = err, 1
    if msg:
        try:
            typer.echo(f"error: {msg}" if msg != "interrupted" else msg, err=True)
        except OSError:
            pass
    sys.exit(code)


if __name__ == "__main__":
    main()
