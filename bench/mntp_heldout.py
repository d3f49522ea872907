"""Held-out MNTP loss along an encoder-from-decoder conversion (issue 12, item 7).

For the source decoder (step 0, attention switched to bidirectional) and every checkpoint of
an MNTP conversion run, the mean MNTP loss on held-out text with fixed masks (15%, seed 0),
read at i - 1 (MNTP) and, as a control, at i (MLM-style). The training loss of a conversion is
noisy (about 600 masked tokens a step in the demo); this is the same rows and masks each time.

    python bench/mntp_heldout.py --source DEMO/pair/decoder --run DEMO/convert/encoder-from-decoder \
        [--heldout TEXTS.jsonl(.gz)] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ettin import checkpoint as ckpt
from ettin.data.tokenizer import encode_document, load_tokenizer
from ettin.objectives import heldout_loss
from ettin.train.trainer import RunDir, last_checkpoint


def heldout_rows(path: Path, tok_dir: Path, cfg, seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out documents packed into rows of ``seq_len`` (doc ids confine attention)."""
    tok = load_tokenizer(tok_dir)
    stream, docs = [], []
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            ids = encode_document(tok, json.loads(line)["text"], cfg.cls_id, cfg.sep_id)
            stream += ids
            docs += [i] * len(ids)
    n = len(stream) // seq_len * seq_len
    ids = torch.tensor(stream[:n]).view(-1, seq_len)
    d = torch.tensor(docs[:n]).view(-1, seq_len)
    return ids, d - d[:, :1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="the decoder run (or checkpoint) the conversion started from")
    ap.add_argument("--run", type=Path, required=True, help="the MNTP conversion run directory")
    ap.add_argument("--heldout", type=Path, help="JSONL(.gz) with a 'text' field per line (default: the demo's held-out books)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    src = last_checkpoint(a.source)
    model = ckpt.load_model(src)
    model.set_causal(False, objective="mntp")
    if a.heldout is None:
        from ettin.data import demo_heldout_path

        a.heldout = demo_heldout_path()
    ids, docs = heldout_rows(a.heldout, ckpt.tokenizer_dir(src), model.config, a.seq_len)
    rows = []

    def measure(step: int, m) -> None:
        r = {"step": step, "mntp": heldout_loss(m, ids, objective="mntp", doc_ids=docs), "mntp_read_at_i": heldout_loss(m, ids, objective="mntp", doc_ids=docs, shift=0)}
        rows.append(r)
        print(f"step {step:5d}  held-out MNTP loss {r['mntp']:.4f}  (read at i: {r['mntp_read_at_i']:.4f})", flush=True)

    measure(0, model)
    for step, path in RunDir(a.run).list_checkpoints():
        measure(step, ckpt.load_model(path))
    print(f"{ids.numel():,} held-out tokens in {ids.shape[0]} rows of {a.seq_len}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "tokens": ids.numel()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
