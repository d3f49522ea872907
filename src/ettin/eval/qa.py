"""Open-ended QA (``qa/triviaqa``: id, question, answer, aliases): decoders only.

As the harness's ``triviaqa`` task: prompt ``Question: {question}?\\nAnswer:`` (no doubled
question mark), greedy generation stopped at a newline, "." or ",", leading whitespace removed,
then SQuAD-style normalised exact match against every alias (and the answer). Encoders do not
generate; their result is a note, not a number.
"""

from __future__ import annotations

from pathlib import Path

from ettin.errors import EttinError
from ettin.eval import scoring
from ettin.eval.data import example_id, load_records, require_split
from ettin.eval.metrics import harness_exact_match

KNOWN = ("triviaqa",)
STOP = ("\n", ".", ",")


def prompt(question: str) -> str:
    return f"Question: {question}?\nAnswer:"


def load(spec, task_dir: Path, split: str, opts) -> list[dict]:
    files = require_split(task_dir, split, spec.name)
    docs = load_records(files, {"question": str}, what="QA")
    for d in docs:
        answers = list(d.get("aliases") or [])
        if not answers and isinstance(d.get("answer"), str):
            answers.append(d["answer"])
        if not answers or not all(isinstance(a, str) for a in answers):
            raise EttinError(f"{d['_where']}: QA lines need 'aliases' (a list of strings) and/or 'answer'")
        d["_answers"] = answers
        d["_id"] = example_id(d, len(files))
    if opts.limit:
        docs = docs[: opts.limit]
    return docs


def run(em, spec, docs: list[dict], opts, samples: list | None = None) -> dict:
    if em.is_encoder:
        return {"note": "not applicable: encoders do not generate text (decoder-only task)", "n": 0}
    cfg = em.config
    tok = em.tokenizer
    prompts = tok.encode_batch([prompt(d["question"]) for d in docs])
    if opts.bos:
        prompts = [[cfg.cls_id] + p for p in prompts]
    outs = scoring.greedy_generate(em.model, tok, prompts, pad_id=cfg.pad_id, eos_id=cfg.sep_id, batch_size=opts.batch_size,
                                   max_new_tokens=opts.max_new_tokens, stop=STOP, max_length=opts.max_length)
    outs = [o.strip() for o in outs]  # remove_whitespace
    hits = [harness_exact_match(o, d["_answers"]) for o, d in zip(outs, docs)]
    if samples is not None:
        for o, d, h in zip(outs, docs, hits):
            samples.append({"id": d["_id"], "label": d["_answers"], "prediction": o, "metrics": {"exact_match": h}})
    em_sum = sum(hits)
    n = len(docs)
    return {"exact_match": em_sum / n if n else float("nan"), "n": n}
