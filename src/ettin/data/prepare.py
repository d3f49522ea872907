"""``ettin data prepare``: tokenize inputs into memory-mapped shards, in parallel, streaming.

The main process reads the inputs and cuts them into chunks of about 512 KB (raw JSONL lines or
texts); N worker processes decode, validate and tokenize chunks (one tokenizer thread each);
the main process writes results in input order, so the output is byte-identical for any worker
count. At most ``2 * workers + 2`` chunks are in flight, so memory is bounded by the chunk size,
not by the input size. A single huge document (one 50 MB JSONL line) is held as text once, but
tokenized in pieces of about ``PIECE_CHARS`` characters cut before a space that follows a
non-space, where the byte-level pre-tokenizer always splits: the ids are the same as for the
whole text, without the tokenizer's per-token bookkeeping for millions of tokens at once
(6.8 GB for 23M tokens). Everything is built in a temporary
directory beside DATA_DIR and renamed into place at the end: DATA_DIR is complete or absent.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from ettin.data.readers import TEXT_UNITS, Chunk, InputSpec, chunk_texts, expand_inputs, iter_chunks
from ettin.data.shards import DEFAULT_SHARD_TOKENS, FORMAT, MANIFEST, TOKENIZER_SUBDIR, VERSION, ShardWriter, fingerprint
from ettin.data.tokenizer import copy_tokenizer_files, resolve_dir, tokenizer_info
from ettin.errors import EttinError

CHUNK_BYTES = 1 << 19
PIECE_CHARS = 1 << 18  # a document longer than this is tokenized in pieces

_W: dict = {}


def _init_worker(tokenizer_json: str, cls_id: int, sep_id: int, dtype: str, text_field: str, skip_empty: bool, single_thread: bool) -> None:
    if single_thread:
        # N processes already use N cores; a rayon pool per process would oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    _W.update(tok=tok, cls=cls_id, sep=sep_id, dtype=np.dtype(dtype), field=text_field, skip_empty=skip_empty)
    _W["encode"] = getattr(tok, "encode_batch_fast", tok.encode_batch)


def _bad_unicode(chunk: Chunk, texts: list[str], where: list[int]) -> EttinError | None:
    for t, i in zip(texts, where):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            return EttinError(f"{chunk.where(i)}: text is not valid Unicode ({e.reason} at character {e.start + 1}, e.g. an unpaired \\u surrogate escape)")
    return None


def _process(chunk: Chunk):
    """Worker: chunk -> (input index, token array, document lengths, skipped, input bytes)."""
    texts, where = chunk_texts(chunk, _W["field"])
    short = [t for t in texts if len(t) <= PIECE_CHARS]
    try:
        encs_short = iter(_W["encode"](short, add_special_tokens=False)) if short else iter(())
    except Exception:
        err = _bad_unicode(chunk, texts, where)
        if err is not None:
            raise err from None
        raise
    encs = [next(encs_short) if len(t) <= PIECE_CHARS else None for t in texts]
    cls, sep = _W["cls"], _W["sep"]
    dtype = _W["dtype"]
    parts: list[np.ndarray] = []
    flat: list[int] = []
    lens: list[int] = []
    skipped = 0
    for j, e in enumerate(encs):
        ids = _long_ids(texts[j], chunk, where[j]) if e is None else e.ids
        if not len(ids):
            if not _W["skip_empty"]:
                raise EttinError(f"{chunk.where(where[j])}: document tokenizes to nothing (empty text); remove it or pass --skip-empty")
            skipped += 1
            continue
        if isinstance(ids, np.ndarray):
            if flat:
                parts.append(np.array(flat, dtype=dtype))
                flat = []
            parts.append(np.concatenate([np.array([cls], dtype), ids.astype(dtype, copy=False), np.array([sep], dtype)]))
        else:
            flat.append(cls)
            flat.extend(ids)
            flat.append(sep)
        lens.append(len(ids) + 2)
    if flat or not parts:
        parts.append(np.array(flat, dtype=dtype))
    toks = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return chunk.input_index, toks, np.array(lens, dtype=np.int64), skipped


def split_points(text: str, piece: int) -> list[int]:
    """Cut positions for a long text: each just before a space preceded by a non-space.

    Byte-level BPE (and whitespace-splitting pre-tokenizers) never join across such a point, so
    tokenizing the pieces gives the ids of the whole. A stretch of ``4 * piece`` characters
    without one (no spaces at all) is cut where it is, and only then can ids differ there.
    """
    cuts = []
    pos, n = 0, len(text)
    while n - pos > piece:
        target = pos + piece
        i = text.find(" ", target, pos + 4 * piece)
        while i != -1 and (text[i - 1].isspace() or i == pos):
            i = text.find(" ", i + 1, pos + 4 * piece)
        cut = i if i != -1 else target
        cuts.append(cut)
        pos = cut
    return cuts


def _long_ids(text: str, chunk: Chunk, w: int) -> np.ndarray:
    """Token ids of one long document, tokenized piece by piece (bounded memory)."""
    encode = _W["tok"].encode
    out = []
    prev = 0
    for cut in [*split_points(text, PIECE_CHARS), len(text)]:
        try:
            ids = encode(text[prev:cut], add_special_tokens=False).ids
        except Exception:
            err = _bad_unicode(chunk, [text[prev:cut]], [w])
            if err is not None:
                raise err from None
            raise
        out.append(np.array(ids, dtype=_W["dtype"]))
        prev = cut
    return np.concatenate(out) if out else np.zeros(0, _W["dtype"])


def _mp_context():
    # fork: no re-import of __main__ (a script calling prepare() needs no main guard) and
    # millisecond start-up. Workers only load a fresh tokenizer and numpy, never touching
    # state inherited from the parent's threads. Elsewhere (macOS, Windows) spawn.
    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _start_pool(workers: int, init_args: tuple):
    # Children inherit TOKENIZERS_PARALLELISM=false at the fork itself, so the tokenizers library
    # neither warns about a fork after parallel use nor touches its inherited thread pool.
    key = "TOKENIZERS_PARALLELISM"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return _mp_context().Pool(workers, initializer=_init_worker, initargs=(*init_args, True))
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Progress:
    """Progress over input bytes (MB), showing documents, tokens and tokens/s (ettin.progress)."""

    def __init__(self, enabled: bool, total_bytes: int, label: str):
        from ettin.progress import progress

        self.tokens = 0
        self.docs = 0
        self.t0 = time.perf_counter()
        self.p = progress(total_bytes / 1e6 if total_bytes else None, label, "MB", quiet=None if enabled else True)

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.close()

    def on_bytes(self, n: int) -> None:
        self.p.advance(n / 1e6)

    def on_result(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.p.update(docs=f"{self.docs:,}", tokens=f"{self.tokens:,}", **{"tok/s": _si(self.tokens / dt)})


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def prepare(
    inputs,
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    name: str | None = None,
    workers: int | None = None,
    text_unit: str = "file",
    skip_empty: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Tokenize ``inputs`` with ``tokenizer`` into the data directory ``out``; returns the manifest
    (plus ``"stats"``: seconds and tokens/s, not stored). Raises EttinError on bad input, leaving
    ``out`` as it was."""
    from ettin import __version__
    from ettin.fsutil import atomic_dir

    specs = expand_inputs(inputs)
    tdir = resolve_dir(tokenizer)
    info = tokenizer_info(tdir)
    from ettin.safety import check_parent, is_run_dir

    out = Path(out)
    check_parent(out)
    if out.exists():
        if not out.is_dir():
            raise EttinError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise EttinError(f"{out}: already exists (pass --overwrite to replace it)")
        if is_run_dir(out):
            raise EttinError(f"{out}: is a training run; refusing to replace it even with --overwrite")
    for s in specs:
        try:
            s.path.resolve().relative_to(out.resolve())
            raise EttinError(f"{s.path}: input lies inside the output directory {out}")
        except ValueError:
            pass
    if text_unit not in TEXT_UNITS:
        raise EttinError(f"--text-unit must be one of {', '.join(TEXT_UNITS)}, got '{text_unit}'")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise EttinError(f"--workers must be at least 1, got {workers}")
    dtype = info["dtype"]
    per_input = [{"documents": 0, "tokens": 0, "skipped_empty": 0} for _ in specs]
    init_args = (str(tdir / "tokenizer.json"), info["cls_id"], info["sep_id"], dtype, text_field, skip_empty)
    t0 = time.perf_counter()

    # Workers start before any thread of ours (the progress bar's) exists: forking is then safe.
    pool = _start_pool(workers, init_args) if workers > 1 else None
    try:
        with atomic_dir(out) as tmp, _Progress(progress, sum(s.size for s in specs), f"prepare {name or out.name}") as bar:
            writer = ShardWriter(tmp, dtype, shard_tokens)

            def chunks():
                for idx, spec in enumerate(specs):
                    yield from iter_chunks(spec, idx, text_field=text_field, text_unit=text_unit, chunk_bytes=chunk_bytes, on_bytes=bar.on_bytes)
                    if spec.documents == 0:
                        raise EttinError(f"{spec.path}: empty input (no documents)")

            def consume(result) -> None:
                idx, toks, lens, skipped = result
                writer.add(toks, lens)
                st = per_input[idx]
                st["documents"] += len(lens)
                st["tokens"] += len(toks)
                st["skipped_empty"] += skipped
                bar.on_result(len(lens), len(toks))

            try:
                if pool is None:
                    _init_worker(*init_args, single_thread=False)
                    for ch in chunks():
                        consume(_process(ch))
                else:
                    pending: deque = deque()
                    limit = 2 * workers + 2
                    for ch in chunks():
                        pending.append(pool.apply_async(_process, (ch,)))
                        while len(pending) >= limit:
                            consume(pending.popleft().get())
                    while pending:
                        consume(pending.popleft().get())
                shards = writer.close()
            except BaseException:
                writer.abort()
                raise
            if writer.documents == 0:
                skipped = sum(p["skipped_empty"] for p in per_input)
                raise EttinError(f"no documents left to write ({skipped} empty documents skipped)")
            copy_tokenizer_files(tdir, tmp / TOKENIZER_SUBDIR)
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "name": name or out.name,
                "created_by": f"ettin {__version__}",
                "dtype": dtype,
                "documents": writer.documents,
                "tokens": writer.tokens,
                "skipped_empty": sum(p["skipped_empty"] for p in per_input),
                "text_field": text_field,
                "text_unit": text_unit,
                "tokenizer": {k: info[k] for k in ("hash", "vocab_size", "real_vocab_size", "cls_id", "sep_id", "pad_id", "mask_id")},
                "inputs": [_input_entry(s, p) for s, p in zip(specs, per_input)],
                "shards": shards,
            }
            manifest["fingerprint"] = fingerprint(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    dt = time.perf_counter() - t0
    manifest["stats"] = {"seconds": dt, "tokens_per_s": manifest["tokens"] / max(dt, 1e-9), "workers": workers}
    return manifest


def _input_entry(spec: InputSpec, stats: dict) -> dict:
    return {"path": str(spec.path.resolve()), "kind": spec.kind + (f".{spec.compression}" if spec.compression else ""), "bytes": spec.size, "sha256": spec.sha256, **stats}
