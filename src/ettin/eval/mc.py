"""Zero-shot multiple choice (``mc/<task>/<split>*.jsonl``: id, context, choices, label).

Prompts, target delimiter (" "), context/continuation tokenisation and ``acc``/``acc_norm``
follow the lm-evaluation-harness task definitions (arc, piqa, siqa, boolq, hellaswag,
openbookqa, winogrande). WinoGrande uses the harness's partial evaluation: each option fills
the blank in the context, and the (shared) text after the blank is what is scored. ``acc_norm``
divides each choice's log-likelihood by the character length of the choice string (for
WinoGrande the harness's choice strings are the filled-in contexts).

Decoders: log P(" " + choice | [CLS] + prompt) (``"scoring": "causal"``). Encoders, by default
as the Ettin authors score them (``"scoring": "ltr"``): the same continuation tokens left to
right, token k read at the first of three [MASK]s in ``[CLS] prompt cont[:k] [MASK] [MASK]
[MASK] [SEP]`` (MNTP-converted encoders: at the position before); ``encoder_scoring="pll"``
(``--encoder-scoring pll``): the pseudo-log-likelihood of the continuation tokens in
``[CLS] prompt continuation [SEP]``, each masked in turn.
Any other directory under ``mc/`` is scored the same way with the raw context as the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import EttinError
from ettin.eval import scoring
from ettin.eval.data import example_id, load_records, require_split

KNOWN = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "siqa", "boolq", "winogrande", "openbookqa")


def _hellaswag_pre(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _question_answer(d: dict) -> tuple[str, list[str]]:
    return f"Question: {d['context']}\nAnswer:", d["choices"]


def _piqa(d: dict) -> tuple[str, list[str]]:
    goal = d.get("goal") if isinstance(d.get("goal"), str) else d["context"]
    return f"Question: {goal}\nAnswer:", d["choices"]


def _siqa(d: dict) -> tuple[str, list[str]]:
    if isinstance(d.get("passage"), str) and isinstance(d.get("question"), str):
        return f"Q: {d['passage']} {d['question']}\nA:", d["choices"]
    return f"Q: {d['context']}\nA:", d["choices"]


def _boolq(d: dict) -> tuple[str, list[str]]:
    if isinstance(d.get("passage"), str) and isinstance(d.get("question"), str):
        return f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", d["choices"]
    return f"{d['context']}\nAnswer:", d["choices"]


def _hellaswag(d: dict) -> tuple[str, list[str]]:
    return _hellaswag_pre(d["context"]), [_hellaswag_pre(c) for c in d["choices"]]


def _plain(d: dict) -> tuple[str, list[str]]:
    return d["context"], d["choices"]


PROMPTS = {
    "arc_easy": _question_answer,
    "arc_challenge": _question_answer,
    "piqa": _piqa,
    "siqa": _siqa,
    "boolq": _boolq,
    "hellaswag": _hellaswag,
    "openbookqa": _plain,
}


@dataclass
class MCItem:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    lengths: list[float]  # characters of each choice string (acc_norm)
    label: int
    id: object = None  # the data's id (or line number), for per-example output


def _winogrande(d: dict) -> MCItem:
    opts, cont = d.get("context_options"), d.get("continuation")
    if isinstance(opts, list) and isinstance(cont, str) and len(opts) == len(d["choices"]):
        contexts = list(opts)
        target = cont.strip()
    else:  # rebuild the partial form from the sentence with a blank, as the harness does
        sentence = d.get("sentence") if isinstance(d.get("sentence"), str) else d["context"]
        if "_" not in sentence:
            raise EttinError(f"{d['_where']}: winogrande line needs 'context_options' + 'continuation' or a sentence with a '_' blank")
        idx = sentence.index("_")
        contexts = [sentence[:idx] + opt for opt in d["choices"]]
        target = sentence[idx + 1:].strip()
    return MCItem([(c, " " + target) for c in contexts], [float(len(c)) for c in contexts], d["label"])


def build_items(task: str, docs: list[dict], n_files: int = 1) -> list[MCItem]:
    items = []
    prompt = PROMPTS.get(task, _plain)
    for d in docs:
        if task == "winogrande":
            it = _winogrande(d)
        else:
            ctx, choices = prompt(d)
            it = MCItem([(ctx, " " + c) for c in choices], [float(len(c)) for c in choices], d["label"])
        it.id = example_id(d, n_files)
        items.append(it)
    return items


def load(spec, task_dir: Path, split: str, opts) -> list[MCItem]:
    files = require_split(task_dir, split, spec.name)
    docs = load_records(files, {"context": str, "choices": list, "label": int}, what="multiple-choice")
    for d in docs:
        ch = d["choices"]
        if len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise EttinError(f"{d['_where']}: 'choices' must be a list of at least two strings")
        if not 0 <= d["label"] < len(ch):
            raise EttinError(f"{d['_where']}: label {d['label']} is not an index into its {len(ch)} choices")
    if opts.limit:
        docs = docs[: opts.limit]
    return build_items(spec.name, docs, len(files))


def choice_loglikelihoods(em, items: list[MCItem], opts) -> list[list[float]]:
    """Per item, the (pseudo-)log-likelihood of each choice."""
    cfg = em.config
    tok = em.tokenizer
    flat = [r for it in items for r in it.requests]
    pairs = scoring.split_pairs(tok, flat)
    if em.is_encoder:
        reqs = [([cfg.cls_id] + ctx, cont, [cfg.sep_id]) for ctx, cont in pairs]
        fn = scoring.masked_ltr_loglikelihood if opts.encoder_scoring == "ltr" else scoring.masked_loglikelihood
        res = fn(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size,
                 max_length=opts.max_length, mntp=cfg.objective == "mntp")
    else:
        bos = [cfg.cls_id] if opts.bos else []
        reqs = [((bos + ctx) or [cfg.cls_id], cont) for ctx, cont in pairs]
        # choices of one item usually share their context tokens: score them together
        groups, owners = [], []
        k = 0
        for it in items:
            n = len(it.requests)
            ctxs = {tuple(reqs[k + j][0]) for j in range(n)}
            if len(ctxs) == 1:
                groups.append((reqs[k][0], [reqs[k + j][1] for j in range(n)]))
                owners.append(list(range(k, k + n)))
            else:  # e.g. WinoGrande: the options are in the contexts
                for j in range(n):
                    groups.append((reqs[k + j][0], [reqs[k + j][1]]))
                    owners.append([k + j])
            k += n
        got = scoring.loglikelihood_shared(em.model, groups, pad_id=cfg.pad_id, batch_size=opts.batch_size,
                                           max_length=opts.max_length)
        res = [None] * len(reqs)
        for own, g in zip(owners, got):
            for idx, r in zip(own, g):
                res[idx] = r
    out, k = [], 0
    for it in items:
        out.append([res[k + j][0] for j in range(len(it.requests))])
        k += len(it.requests)
    return out


def _argmax(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def score(items: list[MCItem], lls: list[list[float]], samples: list | None = None) -> dict:
    acc = acc_norm = 0.0
    for it, ll in zip(items, lls):
        pred = _argmax(ll)
        pred_norm = _argmax([v / n if n else v for v, n in zip(ll, it.lengths)])
        acc += float(pred == it.label)
        acc_norm += float(pred_norm == it.label)
        if samples is not None:
            samples.append({"id": it.id, "label": it.label, "prediction": pred, "prediction_norm": pred_norm,
                            "scores": list(ll), "metrics": {"acc": float(pred == it.label), "acc_norm": float(pred_norm == it.label)}})
    n = len(items)
    return {"acc": acc / n if n else float("nan"), "acc_norm": acc_norm / n if n else float("nan"), "n": n}


def scoring_name(em, opts) -> str:
    """What the JSON names the scoring: ``causal`` (decoders), ``ltr`` or ``pll`` (encoders)."""
    return opts.encoder_scoring if em.is_encoder else "causal"


def run(em, spec, items: list[MCItem], opts, samples: list | None = None) -> dict:
    out = score(items, choice_loglikelihoods(em, items, opts), samples)
    out["scoring"] = scoring_name(em, opts)
    return out
