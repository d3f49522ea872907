"""ettin.progress: plain heartbeat lines off a terminal (within the interval), nothing when quiet,
one shared live display for nested bars on a terminal, and the long commands use it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from ettin import progress as P

SLOW = """
import time
from ettin.progress import progress, status
status("starting")
with progress(10, "slow job", "items") as bar:
    bar.advance(1, loss=1.5)
    time.sleep(3.0)   # one long step: the heartbeat must still speak
    bar.advance(9)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("ETTIN_QUIET", "ETTIN_PROGRESS_INTERVAL")}
    env.update(extra)
    return env


def test_plain_lines_within_the_interval_off_a_terminal():
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", SLOW], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=_env(ETTIN_PROGRESS_INTERVAL="0.5"))
    arrivals = []
    for line in p.stderr:
        arrivals.append((time.monotonic() - t0, line.rstrip("\n")))
    assert p.wait(timeout=60) == 0
    lines = [x for _, x in arrivals]
    assert lines[0] == "starting"
    state = [(t, x) for t, x in arrivals if x.startswith("slow job: 1/10 items")]
    # first state line after 0.5 s (min(2, interval)), then one every ~0.5 s during the 3 s step
    assert len(state) >= 4, lines
    gaps = [b[0] - a[0] for a, b in zip(state, state[1:])]
    assert max(gaps) < 1.5, gaps
    assert "(10%)" in state[0][1] and "loss 1.5" in state[0][1] and "elapsed" in state[0][1]
    assert re.match(r"slow job: done 10/10 items in 0:0[3-9]", lines[-1]), lines[-1]
    assert not any("\x1b" in x for x in lines)  # no terminal control codes in a log


def test_quiet_prints_nothing():
    p = subprocess.run([sys.executable, "-c", SLOW.replace("3.0", "0.5")], capture_output=True, text=True,
                       env=_env(ETTIN_PROGRESS_INTERVAL="0.1", ETTIN_QUIET="1"), timeout=60)
    assert p.returncode == 0 and p.stderr == "" and p.stdout == ""


def test_line_reports_rate_eta_and_unknown_totals(monkeypatch):
    b = P.Bar(100, "eval x", "docs", quiet=False)
    b._t0 -= 10.0  # 10 s in
    b.n = 25
    line = b.line()
    assert line.startswith("eval x: 25/100 docs (25%)") and "2.5 docs/s" in line and "ETA 0:30" in line
    u = P.Bar(None, "read", "docs", quiet=False)
    u._t0 -= 4.0
    u.n = 2
    assert u.line().startswith("read: 2 docs, 2 s/doc") and "ETA" not in u.line()


def test_nested_bars_share_one_live_display(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(P, "is_terminal", lambda: True)
    monkeypatch.setattr(P, "_stream", lambda: buf)
    P.set_quiet(False)
    try:
        with P.progress(2, "checkpoints", "models") as outer:
            for i in range(2):
                with P.progress(3, f"eval ck{i}", "tasks", leave=False) as inner:
                    inner.advance(3)
                    P.status(f"table {i}")
                outer.advance(1)
        assert P._live is None and P._active == []
    finally:
        P.set_quiet(None)
    out = buf.getvalue()
    assert "table 0" in out and "table 1" in out and "checkpoints" in out


def test_quiet_argument_and_set_quiet(capsys):
    P.set_quiet(True)
    try:
        with P.progress(1, "x") as b:
            b.advance(1)
        P.status("hidden")
    finally:
        P.set_quiet(None)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    from ettin.eval.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "run" / "checkpoints" / "5", "decoder", tok_dir, step=5)


def test_eval_cli_prints_progress_off_a_terminal_and_quiet_silences_it(ckpt, data):
    run = ckpt.parent.parent
    args = [sys.executable, "-m", "ettin", "eval", str(run), "--tasks", "arc_easy,winogrande", "--data", str(data), "--no-log"]
    p = subprocess.run(args, capture_output=True, text=True, env=_env(ETTIN_PROGRESS_INTERVAL="0.01"), timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"eval run@5: \w+: \d/2 tasks", p.stderr), p.stderr
    assert "eval run@5: winogrande: done 2/2 tasks" in p.stderr, p.stderr
    assert re.search(r"forwards [1-9]", p.stderr), p.stderr  # movement inside a task too
    assert "arc_easy" in p.stdout  # the results table stays on stdout
    q = subprocess.run(args + ["--quiet"], capture_output=True, text=True, env=_env(ETTIN_PROGRESS_INTERVAL="0.01"), timeout=300)
    assert q.returncode == 0 and q.stderr == "", q.stderr
    assert "arc_easy" in q.stdout


def test_train_prints_plain_lines_off_a_terminal(tmp_path, tiny_data):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_data)
    p = subprocess.run([sys.executable, "-m", "ettin", "train", str(recipe), "--out", str(tmp_path / "run"), "--max-steps", "4"],
                       capture_output=True, text=True, env=_env(ETTIN_PROGRESS_INTERVAL="0.01"), timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("run stage1: ")]
    assert lines and re.search(r"\d/4 steps .*loss enc \d", lines[0]), p.stderr
    assert "\x1b" not in p.stderr and "━" not in p.stderr + p.stdout


def test_live_bar_on_a_terminal_keeps_piped_stdout_in_the_pipe():
    """stderr a terminal, stdout a pipe (`ettin eval ... | tee log`): the bar is live on the
    terminal and the results still reach the pipe, not the terminal."""
    import pty

    code = ("from ettin.progress import progress\n"
            "with progress(2, 'outer', 'models') as o:\n"
            "    print('TABLE-LINE-1'); o.advance(1); print('TABLE-LINE-2'); o.advance(1)\n")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=slave, env=_env(COLUMNS="100"))
    os.close(slave)
    out = p.stdout.read().decode()
    assert p.wait(timeout=60) == 0
    term = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the child side is closed
            break
        if not chunk:
            break
        term += chunk
    os.close(master)
    assert out == "TABLE-LINE-1\nTABLE-LINE-2\n"
    text = term.decode(errors="replace")
    assert "outer" in text and "2/2" in text and "\x1b[" in text and "TABLE" not in text
