"""GLUE classification (``glue/<task>/{train,<split>}*.jsonl`` + ``glue/meta.json``), fine-tuned.

For each learning rate of a small grid and each seed: a fresh copy of the backbone plus a
classification head (dense, GELU, LayerNorm, dropout, linear) on the pooled output is trained
on ``train`` minus a seeded carve-out (``carve_out``, default 10%); the carve-out scores pick
the learning rate (mean over seeds of the task's metric), and the reported numbers are the
mean (and sample std) over seeds at that learning rate on ``<split>``. Metrics follow
``meta.json``: ``accuracy``, ``f1`` (positive class 1) and/or ``matthews_corrcoef``
(``accuracy`` is always reported). ``--limit`` caps train and evaluation examples alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ettin.errors import EttinError
from ettin.eval import finetune as ft
from ettin.eval.data import example_id, load_records, require_split
from ettin.eval.metrics import accuracy, f1_binary, matthews_corrcoef, mean, std

KNOWN = ("cola", "sst2", "mrpc", "rte", "qnli", "mnli")
CARVE_SEED = 1234


@dataclass
class GlueData:
    task: str
    labels: list[str]
    inputs: list[str]
    metric: str
    train: list[tuple[tuple[str, ...], int]]
    eval: list[tuple[tuple[str, ...], int]]
    eval_ids: list | None = None  # the data's id (or line number) of each eval example


def read_meta(glue_dir: Path, task: str) -> dict:
    path = glue_dir / "meta.json"
    if not path.is_file():
        raise EttinError(f"task '{task}': expected {path} (label names and metric per GLUE task), not found")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EttinError(f"{path}: invalid JSON ({e})") from None
    info = meta.get(task) if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        raise EttinError(f"{path}: no entry for task '{task}'")
    labels, metric = info.get("labels"), info.get("metric", "accuracy")
    inputs = info.get("inputs") or ["sentence1", "sentence2"]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise EttinError(f"{path}: '{task}.labels' must be a list of at least two label names")
    if not isinstance(metric, str) or not all(m in ("accuracy", "f1", "matthews_corrcoef") for m in metric.split("+")):
        raise EttinError(f"{path}: '{task}.metric' must be accuracy, f1, matthews_corrcoef or a '+' of them, got {metric!r}")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 2 or not all(isinstance(x, str) for x in inputs):
        raise EttinError(f"{path}: '{task}.inputs' must list one or two field names")
    return {"labels": labels, "metric": metric, "inputs": inputs}


def _examples(files: list[Path], task: str, labels: list[str], inputs: list[str], ids: list | None = None) -> list[tuple[tuple[str, ...], int]]:
    docs = load_records(files, {inputs[0]: str, "label": (int, str)}, what=f"GLUE {task}")
    if ids is not None:
        ids.extend(example_id(d, len(files)) for d in docs)
    out = []
    for d in docs:
        lab = d["label"]
        if isinstance(lab, str) and lab in labels:
            lab = labels.index(lab)
        if isinstance(lab, bool) or not isinstance(lab, int) or not 0 <= lab < len(labels):
            names = ", ".join(f"{i}={n}" for i, n in enumerate(labels))
            raise EttinError(f"{d['_where']}: label {d['label']!r} does not match glue/meta.json for '{task}' ({names})")
        texts = []
        for k in inputs:
            v = d.get(k)
            if not isinstance(v, str):
                raise EttinError(f"{d['_where']}: field '{k}' must be a string (glue/meta.json lists inputs {inputs})")
            texts.append(v)
        out.append((tuple(texts), lab))
    return out


def load(spec, task_dir: Path, split: str, opts) -> GlueData:
    info = read_meta(task_dir.parent, spec.name)
    ids: list = []
    ev = _examples(require_split(task_dir, split, spec.name), spec.name, info["labels"], info["inputs"], ids)
    train: list = []
    if opts.finetune:
        train = _examples(require_split(task_dir, "train", spec.name), spec.name, info["labels"], info["inputs"])
    if opts.limit:
        train = [train[i] for i in ft.shuffled(len(train), 0)][: opts.limit]
        ev = ev[: opts.limit]
        ids = ids[: opts.limit]
    return GlueData(spec.name, info["labels"], info["inputs"], info["metric"], train, ev, ids)


def compute_metrics(pred: list[int], gold: list[int], metric: str) -> dict[str, float]:
    out = {"accuracy": accuracy(pred, gold)}
    if "f1" in metric.split("+"):
        out["f1"] = f1_binary(pred, gold)
    if "matthews_corrcoef" in metric.split("+"):
        out["matthews_corrcoef"] = matthews_corrcoef(pred, gold)
    return out


def primary(metrics: dict[str, float], metric: str) -> float:
    return mean([metrics[m] for m in metric.split("+")])


class Classifier(nn.Module):
    def __init__(self, backbone, n_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        h = backbone.config.hidden
        self.backbone = backbone
        self.pooling = pooling
        self.dense = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=backbone.config.norm_eps)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(h, n_labels)

    def forward(self, x, attention_mask, lengths):
        hs = self.backbone.encode(x, attention_mask=attention_mask)
        pooled = ft.pool(hs, lengths, self.pooling)
        return self.out(self.drop(self.norm(F.gelu(self.dense(pooled)))))


def _predict(clf: Classifier, seqs: list[list[int]], pad_id: int, batch_size: int) -> list[int]:
    dev = next(clf.parameters()).device
    clf.eval()
    preds = [0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            x, am, lengths = ft.pad_batch([seqs[i] for i in chunk], pad_id, dev)
            for i, p in zip(chunk, clf(x, am, lengths).argmax(-1).tolist()):
                preds[i] = p
    return preds


def train_classifier(em, seqs: list[list[int]], labels: list[int], n_labels: int, *, lr: float, seed: int, opts) -> Classifier:
    cfg = em.config
    dev = next(em.model.parameters()).device
    torch.manual_seed(seed)
    clf = Classifier(ft.fresh_copy(em.model), n_labels, ft.pooling_for(cfg, opts)).to(dev)
    clf.train()
    bs = opts.train_batch_size
    total = opts.epochs * ft.steps_per_epoch(len(seqs), bs)
    opt = ft.optimizer(clf.parameters(), lr)
    sched = ft.linear_schedule(opt, total)
    for epoch in range(opts.epochs):
        order = ft.shuffled(len(seqs), seed * 1000 + epoch)
        for s in range(0, len(order), bs):
            chunk = order[s:s + bs]
            x, am, lengths = ft.pad_batch([seqs[i] for i in chunk], cfg.pad_id, dev)
            y = torch.as_tensor([labels[i] for i in chunk], device=dev)
            loss = F.cross_entropy(clf(x, am, lengths).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def run(em, spec, data: GlueData, opts, samples: list | None = None) -> dict:
    if not opts.finetune:
        return {"note": "skipped: GLUE needs fine-tuning (--no-finetune given)", "n": 0}
    cfg = em.config
    tok = em.tokenizer

    def encode(examples):
        cols = list(zip(*[t for t, _ in examples])) if examples else [[]]
        enc = [tok.encode_batch(list(c)) for c in cols]
        seqs = []
        for i in range(len(examples)):
            a = enc[0][i]
            b = enc[1][i] if len(enc) > 1 else None
            seqs.append(ft.frame_pair(a, b, cfg.cls_id, cfg.sep_id, opts.glue_max_length))
        return seqs, [lab for _, lab in examples]

    if len(data.train) < 2:
        raise EttinError(f"task '{data.task}': needs at least 2 training examples to fine-tune, found {len(data.train)}")
    order = ft.shuffled(len(data.train), CARVE_SEED)
    n_dev = min(len(order) - 1, max(1, round(len(order) * opts.carve_out)))
    dev_ex = [data.train[i] for i in order[:n_dev]]
    fit_ex = [data.train[i] for i in order[n_dev:]]
    fit_x, fit_y = encode(fit_ex)
    dev_x, dev_y = encode(dev_ex)
    ev_x, ev_y = encode(data.eval)
    n_labels = len(data.labels)
    by_lr: dict[float, dict] = {}
    for lr in opts.lrs:
        dev_scores, ev_metrics, ev_preds = [], [], []
        for seed in opts.seeds:
            clf = train_classifier(em, fit_x, fit_y, n_labels, lr=lr, seed=seed, opts=opts)
            dev_scores.append(primary(compute_metrics(_predict(clf, dev_x, cfg.pad_id, opts.batch_size), dev_y, data.metric), data.metric))
            preds = _predict(clf, ev_x, cfg.pad_id, opts.batch_size)
            ev_preds.append(preds)
            ev_metrics.append(compute_metrics(preds, ev_y, data.metric))
            del clf
        by_lr[lr] = {"dev": mean(dev_scores), "eval": ev_metrics, "preds": ev_preds}
    best = max(opts.lrs, key=lambda lr: (by_lr[lr]["dev"], -opts.lrs.index(lr)))
    runs = by_lr[best]["eval"]
    if samples is not None:
        ids = data.eval_ids if data.eval_ids is not None else list(range(1, len(ev_y) + 1))
        for seed, preds in zip(opts.seeds, by_lr[best]["preds"]):
            for i, p, y in zip(ids, preds, ev_y):
                samples.append({"id": i, "seed": seed, "lr": best, "label": y, "prediction": p, "metrics": {"accuracy": float(p == y)}})
    out: dict = {}
    for m in runs[0]:
        vals = [r[m] for r in runs]
        out[m] = mean(vals)
        out[f"{m}_std"] = std(vals)
    out["dev_score"] = by_lr[best]["dev"]
    out["lr"] = best
    out["seeds"] = len(opts.seeds)
    out["train_n"] = len(fit_ex)
    out["n"] = len(data.eval)
    return out
