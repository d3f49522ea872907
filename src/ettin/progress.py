"""Progress for long commands: a live bar on a terminal, plain lines elsewhere, nothing when quiet.

Usage (the whole API)::

    from ettin.progress import progress, status

    with progress(total=len(texts), desc="embed", unit="texts") as p:
        for batch in batches:
            ...
            p.advance(len(batch), tok_s="12.3k")      # postfix fields are shown after the counts
    p.update(completed=step, desc="stage2", loss=3.21)  # or set the position / description outright
    status("wrote emb.npy")                           # one line, printed above a live bar if any

* On a terminal (stderr is a TTY) bars are one rich live display: nested bars (eval: checkpoint
  then task) share it. Each shows what runs, done/total, rate, elapsed and ETA.
* Elsewhere (CI logs, ``nohup``, ``| tee``, a file) there is no bar (so nothing is cut at 80
  columns): a heartbeat thread prints one line with every open bar's state (what runs,
  done/total, rate, elapsed, ETA) once a bar has been open 2 s, then at least every
  ``ETTIN_PROGRESS_INTERVAL`` seconds (default 15) even when nothing advanced, so a single slow
  step still shows the command is alive; a closing bar prints a "done" line. Bars that end
  within 2 s print nothing (quick steps stay quiet).
* Quiet (``--quiet`` on any long command, ``ETTIN_QUIET=1`` or :func:`set_quiet`): no bars, no
  status lines; results and errors are still printed by the commands themselves.

All of it goes to stderr, so stdout stays for results (``--json -``). The heartbeat thread
exists only while a bar is open (``ettin data prepare`` forks its workers before opening one).
"""

from __future__ import annotations

import os
import sys
import threading
import time

DEFAULT_INTERVAL = 15.0
_AMOUNTS = {"B", "bytes", "kB", "MB", "GB", "tokens"}  # rates of amounts read per second, never inverted

_lock = threading.RLock()
_active: list["Bar"] = []
_live = None  # the shared rich Progress while a bar is open on a terminal
_quiet: bool | None = None
_heartbeat: threading.Thread | None = None
_stop = threading.Event()
_last_line = 0.0


def set_quiet(quiet: bool | None) -> None:
    """Turn progress and status output off (True), on (False) or back to ``$ETTIN_QUIET`` (None)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("ETTIN_QUIET", "").strip().lower() in ("1", "true", "yes", "on")


def interval() -> float:
    """Seconds between plain progress lines off a terminal (``$ETTIN_PROGRESS_INTERVAL``)."""
    try:
        v = float(os.environ.get("ETTIN_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return v if v > 0 else DEFAULT_INTERVAL


def _stream():
    return sys.stderr


def is_terminal() -> bool:
    try:
        return _stream().isatty()
    except (AttributeError, ValueError):
        return False


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _emit(line: str) -> None:
    """A plain line on stderr (off a terminal, or with no live display)."""
    global _last_line
    with _lock:
        try:
            s = _stream()
            s.write(line + "\n")
            s.flush()
        except (OSError, ValueError):  # a closed pipe must not kill the work
            pass
        _last_line = time.monotonic()


def status(line: str) -> None:
    """One line of narration (what starts, what was written); above the live bar if one is shown."""
    if is_quiet():
        return
    with _lock:
        if _live is not None:
            _live.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            _emit(line)


def _clock(s: float) -> str:
    s = int(max(0, s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


class Bar:
    """One unit of long work: ``total`` (or None when unknown) items of ``unit``."""

    def __init__(self, total: int | float | None, desc: str, unit: str = "it", *, quiet: bool | None = None,
                 completed: int | float = 0, leave: bool = True):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = completed
        self._n0 = completed
        self.leave = leave
        self.postfix: dict = {}
        self.enabled = not (is_quiet() if quiet is None else quiet)
        self._t0 = time.monotonic()
        self._task = None
        self._open = False
        self._shown = False  # a plain line about this bar was printed

    # -- numbers -----------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def rate(self) -> float | None:
        dt = self.elapsed
        done = self.n - self._n0
        return done / dt if dt > 0 and done > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        if r is None or self.total is None:
            return None
        return max(0.0, (self.total - self.n) / r)

    def _post(self) -> str:
        return " ".join(f"{k} {_num(v)}" for k, v in self.postfix.items() if v is not None and v != "")

    def line(self) -> str:
        """The plain one-line state: what runs, done/total, rate, elapsed, ETA, postfix."""
        done = f"{_num(self.n)}/{_num(self.total)}" if self.total is not None else _num(self.n)
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        r = self._rate_text()
        if r:
            parts.append(r)
        parts.append(f"elapsed {_clock(self.elapsed)}")
        e = self.eta()
        if e is not None and self.n < (self.total or 0):
            parts.append(f"ETA {_clock(e)}")
        post = self._post()
        if post:
            parts.append(post)
        return ", ".join(parts)

    # -- updates -----------------------------------------------------------------------------
    def advance(self, n: int | float = 1, **postfix) -> None:
        self.update(completed=self.n + n, **postfix)

    def update(self, completed: int | float | None = None, *, total: int | float | None = None, desc: str | None = None,
               **postfix) -> None:
        if completed is not None:
            self.n = completed
        if total is not None:
            self.total = total
        new_phase = desc is not None and desc != self.desc
        if desc is not None:
            self.desc = desc
        self.postfix.update(postfix)
        if self._task is not None and _live is not None:
            with _lock:
                _live.update(self._task, completed=self.n, total=self.total, description=self.desc,
                             post=self._post(), rate=self._rate_text())
        elif new_phase and self._open and (self._shown or self.elapsed >= first_delay()):
            with _lock:  # off a terminal, a new phase of a bar already worth a line gets one at once
                self._shown = True
                _emit(self.line())

    def _rate_text(self) -> str:
        """'12.5 docs/s', or for slow countable work '2.1 s/step' (amounts such as MB stay per second)."""
        r = self.rate()
        if r is None:
            return ""
        if r >= 1 or self.unit in _AMOUNTS:
            return f"{r:.3g} {self.unit}/s"
        one = self.unit[:-1] if self.unit.endswith("s") and len(self.unit) > 1 else self.unit
        return f"{1 / r:.3g} s/{one}"

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> "Bar":
        if not self.enabled or self._open:
            return self
        self._open = True
        self._t0 = time.monotonic()
        with _lock:
            _active.append(self)
            if is_terminal():
                live = _get_live()
                self._task = live.add_task(self.desc, total=self.total, completed=self.n, post=self._post(), rate="")
            else:
                _start_heartbeat()
        return self

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        with _lock:
            if self in _active:
                _active.remove(self)
            if self._task is not None and _live is not None:
                self.update()
                if not self.leave:
                    _live.remove_task(self._task)
                self._task = None
                if not _active:
                    _stop_live()
            elif self._task is None and (self._shown or self.elapsed >= first_delay()):
                r = self._rate_text()
                _emit(f"{self.desc}: done {_num(self.n)}" + (f"/{_num(self.total)}" if self.total is not None else "")
                      + f" {self.unit} in {_clock(self.elapsed)}" + (f" ({r})" if r else "")
                      + (f", {self._post()}" if self._post() else ""))
        if not _active:
            _stop_heartbeat()

    def __enter__(self) -> "Bar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | float | None = None, desc: str = "", unit: str = "it", *, quiet: bool | None = None,
             completed: int | float = 0, leave: bool = True) -> Bar:
    """A :class:`Bar` to use as a context manager (``quiet=None``: follow ``--quiet``/``$ETTIN_QUIET``).

    ``leave=False`` removes the bar from a terminal display when it closes (inner bars of a loop).
    """
    return Bar(total, desc, unit, quiet=quiet, completed=completed, leave=leave)


# -- the shared terminal display -----------------------------------------------------------------
def _get_live():
    global _live
    if _live is None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        _live = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[post]}"),
            console=Console(file=_stream()),
            transient=False,
            # stdout on the same terminal is printed above the bars; stdout into a pipe or file
            # (`ettin eval ... | tee log`) must stay there, not be moved onto the terminal
            redirect_stdout=_stdout_is_terminal(),
        )
        _live.start()
    return _live


def _stop_live() -> None:
    global _live
    if _live is not None:
        _live.stop()
        _live = None


# -- the heartbeat off a terminal --------------------------------------------------------------
def first_delay() -> float:
    """A bar that ends sooner than this prints nothing off a terminal (no noise from quick steps)."""
    return min(2.0, interval())


def _beat() -> None:
    every = interval()
    tick = max(0.05, min(1.0, every / 4))
    while not _stop.wait(tick):
        with _lock:
            now = time.monotonic()
            due = [b for b in _active if now - b._t0 >= first_delay()]
            if due and (now - _last_line >= every or any(not b._shown for b in due)):
                for b in due:
                    b._shown = True
                _emit(" | ".join(b.line() for b in due))


def _start_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None and _heartbeat.is_alive():
        return
    _stop.clear()
    _heartbeat = threading.Thread(target=_beat, name="ettin-progress", daemon=True)
    _heartbeat.start()


def _stop_heartbeat() -> None:
    global _heartbeat
    t = _heartbeat
    if t is None:
        return
    _stop.set()
    if t is not threading.current_thread():
        t.join(timeout=5)
    _heartbeat = None


def wide_output(columns: int = 200) -> None:
    """Off a terminal, let rich lay out tables and help ``columns`` wide instead of 80 (no wrap
    mid-row in CI logs); an explicit ``$COLUMNS`` wins."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = str(columns)


__all__ = ["Bar", "interval", "is_quiet", "is_terminal", "progress", "set_quiet", "status", "wide_output"]
