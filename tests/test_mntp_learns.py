"""MNTP visibly learns: held-out MNTP loss (fixed masks) falls along an encoder-from-decoder run.

The demo's per-step training loss of a conversion is one batch of ~600 masked tokens, so two
single steps (4.77 -> 4.80 in the issue) say little; the same held-out rows and masks at every
checkpoint do (bench/mntp_heldout.py gives the demo-scale figures).
"""

from __future__ import annotations

import gzip
import json

import torch

from conftest import write_recipe
from ettin import checkpoint as ckpt
from ettin.convert.objective import convert
from ettin.data import demo_heldout_path
from ettin.data.tokenizer import encode_document, load_tokenizer
from ettin.objectives import heldout_loss
from ettin.train.trainer import RunDir, last_checkpoint, train

L = 32


def heldout(tok_dir, cfg, rows: int = 128):
    """Documents the training data never had (the demo's held-out books), in rows of L tokens."""
    tok = load_tokenizer(tok_dir)
    stream, docs = [], []
    with gzip.open(demo_heldout_path(), "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            ids = encode_document(tok, json.loads(line)["text"][:3000], cfg.cls_id, cfg.sep_id)
            stream += ids
            docs += [i] * len(ids)
            if len(stream) >= rows * L:
                break
    n = rows * L
    ids, d = torch.tensor(stream[:n]).view(rows, L), torch.tensor(docs[:n]).view(rows, L)
    return ids, d - d[:, :1]


def test_heldout_mntp_loss_falls_with_training(tiny_data, tmp_path):
    dec = write_recipe(tmp_path / "d.yaml", tiny_data, **{"model.kind": "decoder", "train.tokens": 30 * 8 * 32, "checkpoint.every_tokens": 10**9})
    train(dec, tmp_path / "dec", progress=False)
    cross = write_recipe(
        tmp_path / "x.yaml",
        tiny_data,
        **{
            "name": "cross-objective",
            "train.tokens": 40 * 8 * 32,
            "train.mask_rate": 0.15,
            "train.seed": 210,
            "model.attn_out_dropout": 0.1,
            "checkpoint.every_tokens": 20 * 8 * 32,
            "optim.lr": 3e-3,
            "optim.schedule": {"kind": "trapezoid", "warmup_tokens": 2 * 8 * 32, "decay_tokens": 8 * 8 * 32, "end_factor": 0.02},
        },
    )
    convert(tmp_path / "dec", "mntp", cross, tmp_path / "efd", progress=False)

    src = last_checkpoint(tmp_path / "dec")
    start = ckpt.load_model(src)
    start.set_causal(False, objective="mntp")  # what the conversion starts from
    ids, docs = heldout(ckpt.tokenizer_dir(src), start.config)
    steps = [0] + [s for s, _ in RunDir(tmp_path / "efd").list_checkpoints()]
    models = [start] + [ckpt.load_model(p) for _, p in RunDir(tmp_path / "efd").list_checkpoints()]
    losses = [heldout_loss(m, ids, objective="mntp", doc_ids=docs) for m in models]
    assert steps == [0, 20, 40]
    assert losses[2] < losses[1] < losses[0] - 0.05, losses  # falls, checkpoint after checkpoint (5.51, 5.46, 5.41 here)
    # the shift is what it learned: reading masked token i at output i - 1 beats reading it at i
    at_i = heldout_loss(models[-1], ids, objective="mntp", doc_ids=docs, shift=0)
    assert losses[-1] < at_i - 0.05, (losses[-1], at_i)  # 5.41 vs 5.50 here; 4.84 vs 6.62 at demo scale
