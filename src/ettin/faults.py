"""Named fault points for the fault-injection tests: ``ETTIN_FAULT=NAME`` kills the process there.

``ETTIN_FAULT=NAME@K`` kills at the K-th time the point is reached (1-based). Costs one dict
lookup when unset; nothing else in ettin reads this variable.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    want = os.environ.get("ETTIN_FAULT")
    if not want:
        return
    target, _, nth = want.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
