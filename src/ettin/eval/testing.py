"""Tiny evaluation fixtures: a tokenizer, micro checkpoints and a data directory in the layout of
../shared/data with a handful of lines per task. Used by the tests and handy for demos::

    from ettin.eval.testing import tiny_tokenizer, tiny_checkpoint, write_tiny_data
    tok = tiny_tokenizer(tmp / "tok")
    enc = tiny_checkpoint(tmp / "enc", "encoder", tok)
    data = write_tiny_data(tmp / "data")
"""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The cat sat on the mat and looked at the dog.",
    "A dog ran in the park with a red ball.",
    "She said that he could pay with cash at the shop.",
    "The doctor told the patient that she would be fine.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "Water boils at one hundred degrees when the air is normal.",
    "They were happy because the sun was warm and bright.",
    "def add(a, b):\n    return a + b",
    "Is the sky blue? yes. Is fire cold? no.",
    "The engineer met the client to discuss his plans for the bridge.",
]


def tiny_tokenizer(out: str | Path, vocab_size: int = 300) -> Path:
    """Train a byte-level BPE on a few sentences (specials at ids 0..3); returns its directory."""
    from ettin.data.tokenizer import train_tokenizer

    out = Path(out)
    train_tokenizer(SENTENCES * 3, out, vocab_size, min_frequency=1)
    return out


def tiny_model(kind: str, tokenizer_dir: str | Path, *, size: str = "micro", objective: str | None = None, seed: int = 0):
    import torch

    from ettin.config import preset
    from ettin.data.tokenizer import model_overrides
    from ettin.model import Transformer

    overrides = model_overrides(tokenizer_dir)
    if objective:
        overrides["objective"] = objective
    cfg = preset(size, causal=(kind == "decoder"), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(cfg)


def tiny_checkpoint(out: str | Path, kind: str, tokenizer_dir: str | Path, *, size: str = "micro", objective: str | None = None,
                    seed: int = 0, step: int = 0, tokens: int = 0) -> Path:
    from ettin.checkpoint import save_checkpoint

    model = tiny_model(kind, tokenizer_dir, size=size, objective=objective, seed=seed)
    save_checkpoint(out, model, meta={"step": step, "tokens": tokens}, tokenizer_dir=tokenizer_dir)
    return Path(out)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_tiny_data(root: str | Path) -> Path:
    """A data directory with every task family in miniature (same file layout and fields)."""
    root = Path(root)
    mc = [
        {"id": "q0", "context": "What color is the sky?", "choices": ["blue", "the cat sat"], "label": 0},
        {"id": "q1", "context": "What does a dog chase?", "choices": ["a red ball", "paris"], "label": 0},
        {"id": "q2", "context": "Water boils at", "choices": ["one hundred degrees", "cold"], "label": 0},
        {"id": "q3", "context": "The capital of France is", "choices": ["Paris", "a mat", "warm"], "label": 0},
    ]
    for task in ("arc_easy", "arc_challenge", "openbookqa", "hellaswag"):
        _jsonl(root / "mc" / task / "validation.jsonl", mc)
    _jsonl(root / "mc" / "piqa" / "validation.jsonl", [dict(d, goal=d["context"]) for d in mc])
    _jsonl(root / "mc" / "siqa" / "validation.jsonl",
           [dict(d, passage="The dog was happy.", question=d["context"]) for d in mc])
    _jsonl(root / "mc" / "boolq" / "validation.jsonl",
           [{"id": "b0", "context": "The sky is blue.\nQuestion: is the sky blue", "choices": ["no", "yes"], "label": 1,
             "passage": "The sky is blue.", "question": "is the sky blue"},
            {"id": "b1", "context": "Fire is hot.\nQuestion: is fire cold", "choices": ["no", "yes"], "label": 0,
             "passage": "Fire is hot.", "question": "is fire cold"}])
    _jsonl(root / "mc" / "winogrande" / "validation.jsonl",
           [{"id": "w0", "context": "The cat sat on the mat because _ was tired.", "choices": ["the cat", "the mat"], "label": 0,
             "sentence": "The cat sat on the mat because _ was tired.", "option1": "the cat", "option2": "the mat",
             "context_options": ["The cat sat on the mat because the cat", "The cat sat on the mat because the mat"],
             "continuation": "was tired."}])
    _jsonl(root / "lm_eval" / "lambada_openai" / "validation.jsonl",
           [{"id": "l0", "context": "The cat sat on the", "continuation": "mat"},
            {"id": "l1", "context": "A dog ran in the park with a red", "continuation": "ball"}])
    _jsonl(root / "lm_eval" / "wikitext2" / "validation.jsonl",
           [{"text": " ".join(SENTENCES[:4])}, {"text": ""}, {"text": SENTENCES[5]}])
    _jsonl(root / "qa" / "triviaqa" / "validation.jsonl",
           [{"id": "t0", "question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris", "paris city"]},
            {"id": "t1", "question": "What color is the sky", "answer": "Blue", "aliases": ["blue"]}])
    glue_rows = [
        {"id": f"g{i}", "sentence1": s, "sentence2": SENTENCES[(i + 1) % len(SENTENCES)], "label": i % 2}
        for i, s in enumerate(SENTENCES * 2)
    ]
    meta = {
        "cola": {"labels": ["unacceptable", "acceptable"], "metric": "matthews_corrcoef", "inputs": ["sentence1"]},
        "sst2": {"labels": ["negative", "positive"], "metric": "accuracy", "inputs": ["sentence1"]},
        "mrpc": {"labels": ["not_equivalent", "equivalent"], "metric": "accuracy+f1", "inputs": ["sentence1", "sentence2"]},
        "rte": {"labels": ["entailment", "not_entailment"], "metric": "accuracy", "inputs": ["sentence1", "sentence2"]},
        "qnli": {"labels": ["entailment", "not_entailment"], "metric": "accuracy", "inputs": ["sentence1", "sentence2"]},
        "mnli": {"labels": ["entailment", "neutral", "contradiction"], "metric": "accuracy", "inputs": ["sentence1", "sentence2"]},
    }
    (root / "glue").mkdir(parents=True, exist_ok=True)
    (root / "glue" / "meta.json").write_text(json.dumps(meta, indent=2))
    for task in meta:
        rows = [dict(r, label=r["label"] % len(meta[task]["labels"])) for r in glue_rows]
        _jsonl(root / "glue" / task / "train.jsonl", rows)
        _jsonl(root / "glue" / task / "validation.jsonl", rows[:6])
    for task, split in (("scifact", "train"), ("cosqa", "dev"), ("csn_python_docstring", "dev")):
        d = root / "retrieval" / task
        _jsonl(d / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": s} for i, s in enumerate(SENTENCES)])
        _jsonl(d / "queries.jsonl", [{"_id": f"q{i}", "text": s.split(" ")[1] + " " + s.split(" ")[2]} for i, s in enumerate(SENTENCES)])
        (d / "qrels").mkdir(parents=True, exist_ok=True)
        (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(SENTENCES))))
    w = root / "winogender"
    w.mkdir(parents=True, exist_ok=True)
    (w / "templates.tsv").write_text(
        "occupation(0)\tother-participant(1)\tanswer\tsentence\n"
        "technician\tcustomer\t1\tThe $OCCUPATION told the $PARTICIPANT that $NOM_PRONOUN could pay with cash.\n"
        "nurse\tpatient\t0\tThe $OCCUPATION told the $PARTICIPANT that $NOM_PRONOUN was ready.\n")
    lines = ["sentid\tsentence"]
    for occ, part, ans, tail_m, tail_n in (("technician", "customer", "1", "could pay with cash.", "could pay with cash."),
                                          ("nurse", "patient", "0", "was ready.", "were ready.")):
        for p in (part, "someone"):
            who = f"the {p}" if p != "someone" else "someone"
            base = f"The {occ} told {who} that"
            lines.append(f"{occ}.{p}.{ans}.male.txt\t{base} he {tail_m}")
            lines.append(f"{occ}.{p}.{ans}.female.txt\t{base} she {tail_m}")
            lines.append(f"{occ}.{p}.{ans}.neutral.txt\t{base} they {tail_n}")
    (w / "all_sentences.tsv").write_text("\n".join(lines) + "\n")
    (w / "occupations-stats.tsv").write_text(
        "occupation\tbergsma_pct_female\tbls_pct_female\tbls_year\ntechnician\t9.42\t40.34\t2015\nnurse\t90.1\t90.0\t2015\n")
    return root
