"""Python entry points: :func:`evaluate` one model, :func:`evaluate_all` a path's models.

Task files are read and checked once (:func:`prepare`), before any model is loaded, so a
trajectory of many checkpoints reads its data once and bad input fails before slow work.

Per-example output (``samples=``, what ``ettin eval --samples`` writes; lm-evaluation-harness's
``--log_samples``): every task appends one dict per example,
``{"task", "id", "label", "prediction", "scores"?, "metrics": {name: value}, ...}``:

- ``id``: the data's id, else ``file:line`` (retrieval: the query id; winogender:
  ``occupation.participant.answer``); ``label``: the gold answer; ``prediction``: the model's.
- multiple choice: ``scores`` = the summed log-likelihood of each choice, in choice order,
  under the scoring the result names (``"scoring"``); ``metrics`` ``acc``/``acc_norm`` (0/1).
- ``metrics`` values aggregate to the task's reported numbers by their **mean** over the records
  (``acc``, ``acc_norm``, ``exact_match``, ``ndcg@10``, ``recall@100``, GLUE ``accuracy``, the
  winogender ``male``/``female``/``neutral`` indicators), except the perplexity-type records:
  text perplexity stores per document ``nll`` (minus the summed log-likelihood, nats),
  ``tokens``, ``words`` and ``bytes``: ``perplexity = exp(sum nll / sum tokens)`` (words:
  word_perplexity, bytes: byte_perplexity, ``sum nll / sum bytes / ln 2``: bits_per_byte);
  LAMBADA stores ``nll`` per example: ``perplexity = exp(mean nll)``.
- GLUE (fine-tuned): one record per example and seed (``"seed"``) at the chosen learning rate;
  ``f1`` and ``matthews_corrcoef`` are recomputed per seed from ``label``/``prediction``, then
  averaged over seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ettin.errors import EttinError
from ettin.eval.loading import EvalModel, check_device, load_for_eval
from ettin.eval.options import EvalOptions
from ettin.eval.tasks import TaskSpec, data_dir_or_default, resolve_tasks


def make_options(options: EvalOptions | None = None, **overrides) -> EvalOptions:
    opts = options or EvalOptions()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for k in ("seeds", "lrs"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return opts.replace(**overrides).validate()


def prepare(tasks, data_dir, split: str, opts: EvalOptions) -> list[tuple[TaskSpec, object]]:
    data_dir = data_dir_or_default(data_dir)
    specs = resolve_tasks(tasks, data_dir)
    return [(s, s.module.load(s, s.task_dir(data_dir), split, opts)) for s in specs]


def run_prepared(em: EvalModel, prepared: list[tuple[TaskSpec, object]], opts: EvalOptions,
                 on_task: Callable[[str, dict, float], None] | None = None, samples: list | None = None) -> dict[str, dict]:
    """``{task: result}``; ``samples``: a list that gets one dict per example and task (see above)."""
    from ettin.progress import progress

    results: dict[str, dict] = {}
    label = model_label(em)
    with progress(len(prepared), f"eval {label}", "tasks", leave=False) as bar:
        handle = _count_forwards(em, bar)  # inside a long task, the count of forward passes still moves
        try:
            for spec, data in prepared:
                bar.update(desc=f"eval {label}: {spec.name}")
                t0 = time.perf_counter()
                if samples is None:
                    res = spec.module.run(em, spec, data, opts)
                else:
                    got: list[dict] = []
                    res = spec.module.run(em, spec, data, opts, samples=got)
                    samples.extend({"task": spec.name, **r} for r in got)
                results[spec.name] = res
                bar.advance(1)
                if on_task is not None:
                    on_task(spec.name, res, time.perf_counter() - t0)
        finally:
            if handle is not None:
                handle.remove()
    return results


def _count_forwards(em: EvalModel, bar):
    """A forward hook that shows the number of forward passes on ``bar`` (None when quiet)."""
    if not bar.enabled:
        return None
    count = [0]

    def hook(*_):
        count[0] += 1
        bar.update(forwards=count[0])

    model = em.model
    # every path (logits, sparse prediction, pooled encodings, cached prefixes) ends in final_norm
    return getattr(model, "final_norm", model).register_forward_hook(hook)


def model_label(em: EvalModel) -> str:
    """A short name for progress lines: RUN@step for a run's checkpoint, else the directory name."""
    if em.run_dir is not None and em.step is not None:
        return f"{Path(em.run_dir).name}@{em.step}"
    return Path(em.name).name or em.name


def models_progress(models: list):
    """The outer bar of a trajectory or pair (nothing extra for a single model)."""
    from ettin.progress import progress

    return progress(len(models), "checkpoints", "models", quiet=True if len(models) < 2 else None)


def _as_eval_model(model, tokenizer, device: str | None) -> EvalModel:
    if isinstance(model, EvalModel):
        if device is not None:
            model.device = str(check_device(device))
        return model
    if isinstance(model, (str, Path)):
        models = load_for_eval(model, device or "cpu")
        if len(models) != 1:
            raise EttinError(f"{model}: holds {len(models)} checkpoints; use evaluate_all for a run directory")
        return models[0]
    if hasattr(model, "config") and hasattr(model, "encode"):
        if tokenizer is None:
            raise EttinError("evaluate: pass tokenizer= with an in-memory model")
        em = EvalModel.from_model(model, tokenizer)
        if device is not None:
            em.device = str(check_device(device))
        return em
    raise EttinError(f"evaluate: cannot evaluate a {type(model).__name__} (give an EvalModel, a Transformer or a path)")


def evaluate(model, tasks, data_dir=None, split: str = "validation", *, tokenizer=None, options: EvalOptions | None = None,
             on_task: Callable[[str, dict, float], None] | None = None, samples: list | None = None,
             **overrides) -> dict[str, dict]:
    """``{task: {metric: value, ..., "n": count}}`` for one model.

    ``model``: an :class:`EvalModel`, an ``ettin.model.Transformer`` (with ``tokenizer=`` a
    ``tokenizers.Tokenizer`` or a tokenizer directory), or the path of one checkpoint / HF dir.
    ``tasks``: names and groups, as a list or a comma-separated string. ``overrides`` set
    :class:`EvalOptions` fields (``limit=``, ``batch_size=``, ``device=``, ``seeds=``, ...).
    ``samples``: a list to receive the per-example records (module docstring).
    """
    opts = make_options(options, **overrides)
    em = _as_eval_model(model, tokenizer, overrides.get("device"))
    prepared = prepare(tasks, data_dir, split, opts)
    return run_prepared(em, prepared, opts, on_task, samples)


def tag_samples(em: EvalModel, samples: list[dict]) -> list[dict]:
    """The records with ``model`` and ``step`` (and ``kind``) first."""
    return [{"model": em.name, "step": em.step, "kind": em.kind, **r} for r in samples]


def record(em: EvalModel, results: dict) -> dict:
    """The JSON object for one evaluated model (a trajectory is a list of these)."""
    return {"model": em.name, "kind": em.kind, "step": em.step, "tokens": em.tokens, "results": results}


def evaluate_all(path, tasks, data_dir=None, split: str = "validation", *, options: EvalOptions | None = None,
                 on_model: Callable[[EvalModel, dict], None] | None = None, samples: list | None = None,
                 **overrides) -> list[dict]:
    """Every model ``path`` names (checkpoint, run directory, pair, HF directory), one record each.

    ``samples``: a list that gets every model's per-example records, each starting with
    ``"model"`` (the model's name) and ``"step"`` (its checkpoint step, or None) so the records
    of a trajectory or a pair stay apart.
    """
    opts = make_options(options, **overrides)
    models = path if isinstance(path, list) else load_for_eval(path, opts.device)
    prepared = prepare(tasks, data_dir, split, opts)
    out = []
    with models_progress(models) as bar:
        for em in models:
            got: list | None = [] if samples is not None else None
            res = run_prepared(em, prepared, opts, samples=got)
            if samples is not None:
                samples.extend(tag_samples(em, got))
            out.append(record(em, res))
            if on_model is not None:
                on_model(em, res)
            em.release()
            bar.advance(1)
    return out
