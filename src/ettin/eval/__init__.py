"""Evaluation of encoders and decoders on the same tasks (SPEC section 5).

    from ettin.eval import evaluate, load_for_eval
    [em] = load_for_eval("RUN/checkpoints/100")
    evaluate(em, ["mc", "lambada_openai"], "../shared/data", limit=50)
    # -> {"arc_easy": {"acc": ..., "acc_norm": ..., "n": 50}, ...}

Modules: ``loading`` (what can be evaluated), ``scoring`` (log-likelihood, masked scoring,
generation), one module per task family (``mc``, ``lm``, ``qa``, ``glue``, ``retrieval``,
``winogender``), ``tasks`` (names and groups), ``api``, ``commands`` (``ettin eval``).
"""

import importlib

# Names load on first use (PEP 562), so `ettin --help` and `ettin eval --help` need no torch.
_HOME = {"evaluate": "api", "evaluate_all": "api", "prepare": "api", "run_prepared": "api", "EvalModel": "loading",
         "load_for_eval": "loading", "EvalOptions": "options", "GROUP_NAMES": "tasks", "KNOWN": "tasks", "resolve_tasks": "tasks"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"ettin.eval.{_HOME[name]}"), name)
    raise AttributeError(f"module 'ettin.eval' has no attribute {name!r}")


__all__ = ["EvalModel", "EvalOptions", "GROUP_NAMES", "KNOWN", "evaluate", "evaluate_all", "load_for_eval", "prepare",
           "resolve_tasks", "run_prepared"]
