"""Every command's --help: each option and argument explains itself, no ``<bool>`` after flags,
long commands take --quiet, and ``ettin --help`` does not import torch."""

import os
import subprocess
import sys

import click
import typer.main
from typer.testing import CliRunner

from ettin.cli import app


def _commands(cmd: click.Command, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))
    else:
        yield path, cmd


def _all():
    return list(_commands(typer.main.get_command(app)))


def test_every_option_and_argument_has_help():
    missing = []
    cmds = _all()
    assert len(cmds) >= 15
    for path, cmd in cmds:
        for p in cmd.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"ettin {' '.join(path)} {p.opts[0] if p.opts else p.name}")
    assert not missing, "options without help: " + ", ".join(missing)


def test_help_shows_no_bool_metavar_and_long_commands_take_quiet():
    runner = CliRunner()
    for path, _cmd in _all():
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, (path, res.output)
        assert "<bool>" not in res.output, (path, res.output)
    by_name = {" ".join(p): c for p, c in _all()}
    for name in ("eval", "embed", "export", "import", "convert", "train", "pair", "demo", "report", "data prepare", "tokenizer train"):
        opts = {o for prm in by_name[name].params for o in prm.opts}
        assert "--quiet" in opts, name


def test_top_level_help_does_not_import_torch():
    code = ("import sys, runpy; sys.argv=['ettin','--help']\n"
            "try:\n    runpy.run_module('ettin', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','transformers','numpy','yaml') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert "HEAVY []" in res.stderr, res.stderr[-2000:]
    assert "eval" in res.stdout and "demo" in res.stdout


def test_help_not_wrapped_at_80_columns_off_a_terminal():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    res = subprocess.run([sys.executable, "-m", "ettin", "eval", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert max(len(line) for line in res.stdout.splitlines()) > 100
