"""Evaluation of encoders and decoders on the same tasks (SPEC section 5).

    from ettin.eval import evaluate, load_for_eval
    [em] = load_for_eval("RUN/checkpoints/100")
    evaluate(em, ["mc", "lambada_openai"], "../shared/data", limit=50)
    # -> {"arc_easy": {"acc": ..., "acc_norm": ..., "n": 50}, ...}

Modules: ``loading`` (what can be evaluated), ``scoring`` (log-likelihood, masked scoring,
generation), one module per task family (``mc``, ``lm``, ``qa``, ``glue``, ``retrieval``,
``winogender``), ``tasks`` (names and groups), ``api``, ``commands`` (``ettin eval``).
"""

from ettin.eval.api import evaluate, evaluate_all, prepare, run_prepared
from ettin.eval.loading import EvalModel, load_for_eval
from ettin.eval.options import EvalOptions
from ettin.eval.tasks import GROUP_NAMES, KNOWN, resolve_tasks

__all__ = ["EvalModel", "EvalOptions", "GROUP_NAMES", "KNOWN", "evaluate", "evaluate_all", "load_for_eval", "prepare",
           "resolve_tasks", "run_prepared"]
