"""``ettin embed``: pooled embeddings of many texts with any checkpoint (or HF directory).

Texts are framed as in training and evaluation (``[CLS] text [SEP]``), cut to
``max_length``, and run through :func:`ettin.model.packing.pooled`, which packs
variable-length inputs into rows (no compute on pads where attention skips masked blocks) or
pads length-sorted batches. Output: a float32 ``.npy`` array [N, hidden] in input order,
written under a temporary name and renamed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ettin.errors import EttinError


def read_texts(path: Path, field: str = "text") -> list[str]:
    """``.jsonl`` / ``.jsonl.gz`` (one object per line, ``field`` holds the text) or any other
    file: one text per line."""
    from ettin.eval.data import _open_text, read_jsonl

    if not path.is_file():
        raise EttinError(f"{path}: no such input file")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = []
        for n, obj in read_jsonl(path):
            if not isinstance(obj.get(field), str):
                raise EttinError(f"{path}:{n}: expected an object with a string '{field}'")
            texts.append(obj[field])
    else:
        try:
            with _open_text(path) as fh:
                texts = [line.rstrip("\r\n") for line in fh]
        except UnicodeDecodeError as e:
            raise EttinError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not texts:
        raise EttinError(f"{path}: no texts")
    return texts


def embed_texts(em, texts: list[str], *, pooling: str | None = None, max_length: int = 512, normalize: bool = False,
                strategy: str = "auto", token_budget: int = 32768, chunk: int = 4096, on_progress=None) -> np.ndarray:
    """[N, hidden] float32 embeddings of ``texts`` with an :class:`ettin.eval.loading.EvalModel`."""
    import torch

    from ettin.eval import finetune as ft
    from ettin.model.packing import pooled

    cfg = em.config
    if max_length < 3:
        raise EttinError(f"--max-length must be at least 3 (CLS, one token, SEP), got {max_length}")
    pooling = pooling or ("last" if cfg.causal else "mean")
    model = em.model
    out = np.empty((len(texts), cfg.hidden), dtype=np.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if em.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for s in range(0, len(texts), chunk):
        ids = [ft.frame(x, cfg.cls_id, cfg.sep_id, max_length) for x in em.tokenizer.encode_batch(texts[s:s + chunk])]
        with autocast:
            vec = pooled(model, ids, pad_id=cfg.pad_id, pooling=pooling, strategy=strategy, row_len=max(max_length, 8),
                         token_budget=token_budget, normalize=normalize)
        out[s:s + len(ids)] = vec.float().cpu().numpy()
        if on_progress is not None:
            on_progress(len(ids), sum(map(len, ids)))
    return out


def write_npy(path: Path, arr: np.ndarray) -> None:
    """Atomically: a temporary file in the same directory, then a rename (``run`` checks the suffix first)."""
    import io

    from ettin.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def run(model_path: Path, input_path: Path, out: Path, *, field: str, pooling: str | None, max_length: int, normalize: bool,
        device: str, strategy: str, token_budget: int, console) -> dict:
    from ettin.progress import progress

    from ettin.eval.loading import load_for_eval

    if out.suffix != ".npy":
        raise EttinError(f"{out}: the output must be a .npy file")
    texts = read_texts(input_path, field)
    from ettin.resolve import single_model

    r = single_model(model_path, "embed")  # a run: its last checkpoint; a pair: which side?
    [em] = load_for_eval(r.path, device)
    if r.hub_id:
        em.name = r.hub_id
    t0 = time.perf_counter()
    tokens = 0
    with progress(len(texts), f"embed {Path(em.name).name}", "texts") as bar:

        def on_progress(n: int, t: int) -> None:
            nonlocal tokens
            tokens += t
            bar.advance(n, tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):,.0f}")

        arr = embed_texts(em, texts, pooling=pooling, max_length=max_length, normalize=normalize, strategy=strategy,
                          token_budget=token_budget, on_progress=on_progress)
    secs = time.perf_counter() - t0
    write_npy(out, arr)
    return {"model": em.name, "texts": len(texts), "tokens": tokens, "seconds": round(secs, 2),
            "tokens_per_s": round(tokens / max(secs, 1e-9), 1), "shape": list(arr.shape), "out": str(out)}
