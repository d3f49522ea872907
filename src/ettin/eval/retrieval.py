"""Retrieval (BEIR layout under ``retrieval/<task>/``): embed, rank by cosine, ``ndcg@10``, ``recall@100``.

Embedding model: the backbone's final hidden states pooled as the authors' sentence-transformers
setup does (encoders: mean over the real tokens; decoders: the last token, ``[SEP]``; ``--pooling``
overrides both), L2-normalised. Fine-tuned by default (``--no-finetune`` for zero-shot) with a
contrastive loss (InfoNCE, temperature 0.05, i.e. sentence-transformers'
MultipleNegativesRankingLoss at scale 20): each query against every positive of its batch plus
the batch's hard negatives, on the training pairs available:

- the task's own ``qrels/train.tsv`` if it has one, else the pooled ``qrels/train.tsv`` pairs of
  the other retrieval tasks in the data directory (e.g. CoSQA and the docstring task train on
  SciFact's pairs, as the paper's models are fine-tuned once and evaluated across tasks);
- hard negatives where the data has them: documents judged non-relevant (score <= 0) for the
  query in ``qrels/train.tsv``, then those listed in ``hard_negatives.jsonl`` (lines
  ``{"_id": query id, "negatives": [corpus ids, ...]}``); a training pair takes one of its
  query's negatives in turn. The shared data sets have none (their qrels hold positives only),
  so there the loss uses in-batch negatives alone; the result counts ``hard_negatives``;
- evaluation queries are never trained on. A task with no ``qrels/<split>.tsv`` (SciFact ships
  only ``train.tsv`` here; "validation" also finds ``dev.tsv``) is evaluated on a seeded half of
  its train queries, which then leaves training; the result carries a ``note`` saying so.

``--limit N`` evaluates the first N queries against their relevant documents plus the first
max(100, 10 N) other documents, and caps the training pairs at N.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ettin.errors import EttinError
from ettin.eval import finetune as ft
from ettin.eval.data import read_jsonl, read_tsv
from ettin.eval.metrics import mean, ndcg_at_k, recall_at_k

KNOWN = ("scifact", "cosqa", "csn_python_docstring")
SPLIT_ALIASES = {"validation": ("validation", "dev"), "dev": ("dev", "validation"), "test": ("test",), "train": ("train",)}
CARVE_SEED = 0


@dataclass
class RetrievalData:
    task: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]
    train_pairs: list[tuple[str, str, str | None]]  # (query, positive, hard negative or None)
    train_source: str
    note: str | None = None


def _corpus_path(task_dir: Path, task: str) -> Path:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (task_dir / name).is_file():
            return task_dir / name
    raise EttinError(f"task '{task}': expected {task_dir / 'corpus.jsonl'} (or corpus.jsonl.gz), not found")


def read_corpus(path: Path) -> dict[str, str]:
    out = {}
    for lineno, d in read_jsonl(path):
        if "_id" not in d or not isinstance(d.get("text", ""), str):
            raise EttinError(f"{path}:{lineno}: corpus lines need '_id' and 'text'")
        title = d.get("title") or ""
        out[str(d["_id"])] = (f"{title} {d.get('text', '')}" if title else str(d.get("text", ""))).strip()
    return out


def read_queries(path: Path, task: str) -> dict[str, str]:
    if not path.is_file():
        raise EttinError(f"task '{task}': expected {path}, not found")
    out = {}
    for lineno, d in read_jsonl(path):
        if "_id" not in d or not isinstance(d.get("text"), str):
            raise EttinError(f"{path}:{lineno}: query lines need '_id' and 'text'")
        out[str(d["_id"])] = d["text"]
    return out


def read_qrels(path: Path) -> dict[str, dict[str, float]]:
    cols, rows = read_tsv(path)
    if len(cols) < 3 or cols[0].strip().lower() not in ("query-id", "query_id", "qid"):
        raise EttinError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    out: dict[str, dict[str, float]] = {}
    for lineno, f in rows:
        if len(f) < 3:
            raise EttinError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(f)}")
        try:
            score = float(f[2])
        except ValueError:
            raise EttinError(f"{path}:{lineno}: score {f[2]!r} is not a number") from None
        out.setdefault(f[0], {})[f[1]] = score
    return out


def _qrels_file(task_dir: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES.get(split, (split,)):
        p = task_dir / "qrels" / f"{name}.tsv"
        if p.is_file():
            return p
    return None


def _carve(qids: list[str]) -> tuple[set[str], set[str]]:
    """(train half, held-out half) of a task's train queries: seeded, reproducible."""
    order = sorted(qids)
    idx = ft.shuffled(len(order), CARVE_SEED)
    held = {order[i] for i in idx[: len(order) // 2]}
    return set(order) - held, held


def eval_split(task_dir: Path, split: str, task: str) -> tuple[dict[str, dict[str, float]], set[str], str | None]:
    """(eval qrels, train query ids usable for fine-tuning, note)."""
    path = _qrels_file(task_dir, split)
    train_path = task_dir / "qrels" / "train.tsv"
    train = read_qrels(train_path) if train_path.is_file() else {}
    if path is not None:
        qrels = read_qrels(path)
        return qrels, set(train) - set(qrels), None
    if train:
        keep, held = _carve(list(train))
        note = f"no qrels/{split}.tsv: evaluated on a held-out half of qrels/train.tsv ({len(held)} queries), fine-tuned on the other half"
        return {q: train[q] for q in held}, keep, note
    raise EttinError(f"task '{task}': expected {task_dir / 'qrels' / (split + '.tsv')}, not found")


HARD_NEGATIVES = "hard_negatives.jsonl"


def read_hard_negatives(path: Path) -> dict[str, list[str]]:
    """``{query id: [corpus ids]}`` from ``hard_negatives.jsonl`` (``{"_id", "negatives"}`` lines)."""
    out: dict[str, list[str]] = {}
    for lineno, d in read_jsonl(path):
        negs = d.get("negatives")
        if "_id" not in d or not isinstance(negs, list) or not all(isinstance(x, (str, int)) for x in negs):
            raise EttinError(f"{path}:{lineno}: hard-negative lines need '_id' and 'negatives' (a list of corpus ids)")
        out.setdefault(str(d["_id"]), []).extend(str(x) for x in negs)
    return out


def _pairs(task_dir: Path, usable: set[str]) -> list[tuple[str, str, str | None]]:
    train_path = task_dir / "qrels" / "train.tsv"
    if not usable or not train_path.is_file():
        return []
    train = read_qrels(train_path)
    queries = read_queries(task_dir / "queries.jsonl", task_dir.name)
    corpus = read_corpus(_corpus_path(task_dir, task_dir.name))
    extra = read_hard_negatives(task_dir / HARD_NEGATIVES) if (task_dir / HARD_NEGATIVES).is_file() else {}
    out = []
    for q in sorted(usable):
        judged = train.get(q, {})
        negs = [d for d, s in sorted(judged.items()) if s <= 0 and d in corpus]
        negs += [d for d in extra.get(q, []) if d in corpus and judged.get(d, 0) <= 0 and d not in negs]
        k = 0
        for d, s in sorted(judged.items()):
            if s > 0 and q in queries and d in corpus:
                out.append((queries[q], corpus[d], corpus[negs[k % len(negs)]] if negs else None))
                k += 1
    return out


def load(spec, task_dir: Path, split: str, opts) -> RetrievalData:
    task = spec.name
    corpus = read_corpus(_corpus_path(task_dir, task))
    queries = read_queries(task_dir / "queries.jsonl", task)
    qrels, usable, note = eval_split(task_dir, split, task)
    qrels = {q: r for q, r in qrels.items() if q in queries and any(s > 0 for s in r.values())}
    if not qrels:
        raise EttinError(f"task '{task}': no query of the {split} qrels has a text in {task_dir / 'queries.jsonl'}")
    train_pairs: list[tuple[str, str, str | None]] = []
    source = task
    if opts.finetune:
        train_pairs = _pairs(task_dir, usable)
        if not train_pairs:  # pool the other tasks' training pairs
            sources = []
            for other in sorted(p for p in task_dir.parent.iterdir() if p.is_dir() and p != task_dir):
                if not (other / "qrels" / "train.tsv").is_file():
                    continue
                _, other_usable, _ = eval_split(other, split, other.name)
                got = _pairs(other, other_usable)
                if got:
                    train_pairs.extend(got)
                    sources.append(other.name)
            source = "+".join(sources) if sources else "none"
    if opts.limit:
        qids = list(qrels)[: opts.limit]
        qrels = {q: qrels[q] for q in qids}
        relevant = {d for q in qids for d in qrels[q]}
        others = [d for d in corpus if d not in relevant][: max(100, 10 * opts.limit)]
        corpus = {d: corpus[d] for d in list(relevant) + others if d in corpus}
        train_pairs = [train_pairs[i] for i in ft.shuffled(len(train_pairs), 0)][: opts.limit]
    queries = {q: queries[q] for q in qrels}
    return RetrievalData(task, corpus, queries, qrels, train_pairs, source, note)


def _encode(em, texts: list[str], max_length: int) -> list[list[int]]:
    cfg = em.config
    return [ft.frame(ids, cfg.cls_id, cfg.sep_id, max_length) for ids in em.tokenizer.encode_batch(texts)]


def finetune_embedder(em, pairs: list[tuple[str, str, str | None]], opts):
    """A copy of the backbone trained with InfoNCE: each query against the batch's positives and
    hard negatives (the side's pooling, :func:`ettin.eval.finetune.pooling_for`)."""
    cfg = em.config
    dev = next(em.model.parameters()).device
    pooling = ft.pooling_for(cfg, opts)
    q = _encode(em, [p[0] for p in pairs], opts.query_max_length)
    d = _encode(em, [p[1] for p in pairs], opts.doc_max_length)
    neg_idx = [i for i, p in enumerate(pairs) if p[2] is not None]
    n = dict(zip(neg_idx, _encode(em, [pairs[i][2] for i in neg_idx], opts.doc_max_length)))
    torch.manual_seed(opts.seeds[0])
    model = ft.fresh_copy(em.model)
    bs = max(2, opts.retrieval_batch_size)
    total = opts.retrieval_epochs * ft.steps_per_epoch(len(pairs), bs)
    opt = ft.optimizer(model.parameters(), opts.retrieval_lr)
    sched = ft.linear_schedule(opt, total)
    for epoch in range(opts.retrieval_epochs):
        order = ft.shuffled(len(pairs), opts.seeds[0] * 1000 + epoch)
        for s in range(0, len(order), bs):
            chunk = order[s:s + bs]
            if len(chunk) < 2:
                continue
            xq, amq, lq = ft.pad_batch([q[i] for i in chunk], cfg.pad_id, dev)
            docs = [d[i] for i in chunk] + [n[i] for i in chunk if i in n]  # positives, then hard negatives
            xd, amd, ld = ft.pad_batch(docs, cfg.pad_id, dev)
            eq = F.normalize(ft.pool(model.encode(xq, attention_mask=amq), lq, pooling).float(), dim=-1)
            ed = F.normalize(ft.pool(model.encode(xd, attention_mask=amd), ld, pooling).float(), dim=-1)
            logits = eq @ ed.T / opts.retrieval_temperature
            loss = F.cross_entropy(logits, torch.arange(len(chunk), device=dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def rank(q_emb: torch.Tensor, d_emb: torch.Tensor, qids: list[str], dids: list[str], k: int = 100) -> dict[str, list[str]]:
    """Top-k document ids per query by cosine similarity (a query never retrieves its own id)."""
    out = {}
    pos = {d: i for i, d in enumerate(dids)}
    for s in range(0, len(qids), 256):
        sims = q_emb[s:s + 256] @ d_emb.T
        for j, qid in enumerate(qids[s:s + 256]):
            if qid in pos:
                sims[j, pos[qid]] = float("-inf")
        top = sims.topk(min(k, len(dids)), dim=1).indices.tolist()
        for j, qid in enumerate(qids[s:s + 256]):
            out[qid] = [dids[i] for i in top[j]]
    return out


def run(em, spec, data: RetrievalData, opts, samples: list | None = None) -> dict:
    model = em.model
    tuned = False
    if opts.finetune and data.train_pairs:
        key = ("retrieval-finetune", tuple(data.train_pairs), opts.retrieval_lr, opts.retrieval_epochs, opts.seeds[0],
               ft.pooling_for(em.config, opts))
        model = em.cache.get(key)
        if model is None:
            model = em.cache[key] = finetune_embedder(em, data.train_pairs, opts)
        tuned = True
    qids, dids = list(data.queries), list(data.corpus)
    pooling = ft.pooling_for(em.config, opts)
    q_emb = ft.embed(model, _encode(em, [data.queries[q] for q in qids], opts.query_max_length), pad_id=em.config.pad_id,
                     pooling=pooling, batch_size=opts.batch_size, normalize=True)
    d_emb = ft.embed(model, _encode(em, [data.corpus[d] for d in dids], opts.doc_max_length), pad_id=em.config.pad_id,
                     pooling=pooling, batch_size=opts.batch_size, normalize=True)
    ranked = rank(q_emb, d_emb, qids, dids, 100)
    ndcg = [ndcg_at_k(ranked[q], data.qrels[q], 10) for q in qids]
    recall = [recall_at_k(ranked[q], data.qrels[q], 100) for q in qids]
    if samples is not None:
        for q, a, b in zip(qids, ndcg, recall):
            samples.append({"id": q, "label": {d: s for d, s in data.qrels[q].items() if s > 0}, "prediction": ranked[q][:10],
                            "metrics": {"ndcg@10": a, "recall@100": b}})
    out = {
        "ndcg@10": mean(ndcg),
        "recall@100": mean(recall),
        "finetuned": int(tuned),
        "train_pairs": len(data.train_pairs) if tuned else 0,
        "hard_negatives": sum(p[2] is not None for p in data.train_pairs) if tuned else 0,
        "pooling": pooling,
        "n": len(qids),
    }
    notes = []
    if data.note:
        notes.append(data.note)
    if opts.finetune and not data.train_pairs:
        notes.append("no training pairs found: zero-shot")
    elif tuned and data.train_source != data.task:
        notes.append(f"fine-tuned on {data.train_source} training pairs")
    if notes:
        out["note"] = "; ".join(notes)
    return out
