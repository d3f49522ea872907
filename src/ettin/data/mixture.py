"""Mixtures of prepared sources and the global sample order.

A recipe names sources, each ``{"path": DATA_DIR, "name": ..., "weight": w}`` or
``{..., "epochs": e}`` (neither given means ``epochs: 1``). One *mixture epoch* holds, per
source, a target number of tokens ``t``:

* ``epochs: e`` -> ``t = e * tokens(source)``: the source is repeated ``e`` times per mixture epoch
  (``e`` may be fractional, e.g. 0.5 or 2.5).
* ``weight: w`` -> ``w`` is the source's share of the mixture epoch's tokens. With weights only,
  they are normalised and the epoch is as long as all sources together
  (``t = w / sum(w) * sum(tokens)``), like Megatron's blended datasets. Mixed with
  epoch-counted sources, weights are absolute shares and must sum to < 1; the epoch-counted
  sources fill the rest (``total = sum(e * tokens) / (1 - sum(w))``).

A source gets ``t`` tokens as ``floor(t / tokens)`` full copies of its documents plus, for the
remainder, whole documents taken in a pseudo-random order seeded by (seed, epoch, source) until
the remainder is covered: sampling without replacement inside an epoch, so the token share is
exact up to one document, and a different subset of documents fills the fraction each epoch.

Sample order: epoch ``e`` shuffles its documents with a permutation seeded by (seed, e),
concatenates them and cuts the stream into rows of ``seq_len`` tokens. The epoch has
``rows_per_epoch = floor(sum(t) / seq_len)`` rows; tokens beyond that are dropped. Global row
``r`` is row ``r % rows_per_epoch`` of epoch ``r // rows_per_epoch``: a pure function of
(sources' content, weights/epochs, seq_len, seed, r), independent of world size, gradient
accumulation and batch-size warmup, which only group consecutive rows into batches.

A document cut at a row end continues at the start of the next row as a new segment (no
repeated [CLS]). ``doc_ids`` numbers the segments of each row 0, 1, 2, ...

Permutations come from a splitmix64 hash (:mod:`ettin.data.hashing`), not ``numpy.random``,
so the order is identical across platforms and numpy versions.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ettin.data.hashing import batch_hash, permutation, stream_key
from ettin.data.shards import TokenData, verify as verify_data
from ettin.errors import EttinError

__all__ = ["Mixture", "batch_hash", "MixtureSource"]

MIXTURE_VERSION = 1
_TAG_SHUFFLE = 0
_TAG_SUBSET = 1
_SOURCE_KEYS = ("path", "name", "weight", "epochs")


@dataclass
class MixtureSource:
    path: Path
    name: str
    weight: float | None
    epochs: float | None
    data: TokenData
    target_tokens: int = 0
    doc_base: int = 0

    def describe(self) -> dict:
        d = {"name": self.name, "path": str(self.path), "fingerprint": self.data.fingerprint, "documents": self.data.num_documents, "tokens": self.data.num_tokens, "target_tokens_per_epoch": self.target_tokens}
        d["weight" if self.weight is not None else "epochs"] = self.weight if self.weight is not None else self.epochs
        return d


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise EttinError(f"{what} must be a positive number, got {v!r}")
    return float(v)


class Mixture:
    """Sources + seq_len + seed -> a deterministic, randomly accessible stream of rows."""

    def __init__(self, sources: list[dict], seq_len: int, seed: int, *, verify: bool = False, cache_epochs: int = 2):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise EttinError(f"data: seq_len must be a positive integer, got {seq_len!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise EttinError(f"data: seed must be a non-negative integer, got {seed!r}")
        if not isinstance(sources, (list, tuple)) or not sources:
            raise EttinError("data: a mixture needs at least one source")
        self.seq_len = seq_len
        self.seed = seed
        self.sources: list[MixtureSource] = []
        for i, s in enumerate(sources):
            if isinstance(s, (str, Path)):
                s = {"path": s}
            if not isinstance(s, dict):
                raise EttinError(f"data source {i}: expected a mapping with 'path' and 'weight' or 'epochs', got {type(s).__name__}")
            unknown = [k for k in s if k not in _SOURCE_KEYS]
            if unknown:
                raise EttinError(f"data source {i}: unknown key '{unknown[0]}' (allowed: {', '.join(_SOURCE_KEYS)})")
            if "path" not in s or s["path"] in (None, ""):
                raise EttinError(f"data source {i}: missing 'path'")
            has_w, has_e = s.get("weight") is not None, s.get("epochs") is not None  # null = not given
            if has_w and has_e:
                raise EttinError(f"data source {i} ({s['path']}): give 'weight' or 'epochs', not both")
            weight = _number(s["weight"], f"data source {i} weight") if has_w else None
            epochs = _number(s["epochs"], f"data source {i} epochs") if has_e else (None if has_w else 1.0)
            path = Path(s["path"])
            if not path.exists():
                raise EttinError(f"{path}: data source not found (run 'ettin data prepare ... --out {path}')")
            data = TokenData(path)
            if data.num_documents == 0:
                raise EttinError(f"{path}: data source holds no documents")
            if verify:
                verify_data(path)
            name = str(s.get("name") or data.manifest.get("name") or path.name)
            self.sources.append(MixtureSource(path, name, weight, epochs, data))
        first = self.sources[0]
        for src in self.sources[1:]:
            if src.data.tokenizer_hash != first.data.tokenizer_hash:
                raise EttinError(f"{src.path}: prepared with a different tokenizer than {first.path} (tokenizer hash {src.data.tokenizer_hash[:12]} vs {first.data.tokenizer_hash[:12]})")
        self.tokenizer_dir: Path = first.data.tokenizer_dir
        self.tokenizer_hash: str = first.data.tokenizer_hash
        self._set_targets()
        total = sum(s.target_tokens for s in self.sources)
        self.rows_per_epoch: int = total // seq_len
        if self.rows_per_epoch < 1:
            raise EttinError(f"data: the mixture holds {total} tokens per epoch, fewer than one row of seq_len {seq_len}")
        self.tokens_per_epoch = self.rows_per_epoch * seq_len
        # Global document table (documents of source i are doc_base[i] ...).
        self._shards: list[np.ndarray] = []
        starts, lens, shard_ids = [], [], []
        base = 0
        for src in self.sources:
            src.doc_base = base
            base += src.data.num_documents
            shard_ids.append(src.data.doc_shard.astype(np.int64) + len(self._shards))
            self._shards.extend(src.data.shard_tokens)
            starts.append(src.data.doc_start)
            lens.append(src.data.doc_len)
        self._doc_shard = np.concatenate(shard_ids)
        self._doc_start = np.concatenate(starts)
        self._doc_len = np.concatenate(lens)
        self._single_shard = len(self._shards) == 1
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_epochs = max(1, cache_epochs)
        self._lock = threading.Lock()
        self.fingerprint: str = self._fingerprint()

    # -- construction helpers ----------------------------------------------------------------
    def _set_targets(self) -> None:
        weighted = [s for s in self.sources if s.weight is not None]
        counted = [s for s in self.sources if s.weight is None]
        wsum = sum(s.weight for s in weighted)
        for s in counted:
            s.target_tokens = math.ceil(s.epochs * s.data.num_tokens)
        if weighted:
            if counted:
                if wsum >= 1:
                    raise EttinError(f"data: with epoch-counted sources, weights are shares of the mixture and must sum to < 1 (they sum to {wsum:g})")
                total = sum(s.target_tokens for s in counted) / (1.0 - wsum)
                for s in weighted:
                    s.target_tokens = math.ceil(s.weight * total)
            else:
                total = sum(s.data.num_tokens for s in self.sources)
                for s in weighted:
                    s.target_tokens = math.ceil(s.weight / wsum * total)

    def _fingerprint(self) -> str:
        doc = {
            "version": MIXTURE_VERSION,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "sources": [{"fingerprint": s.data.fingerprint, **({"weight": s.weight} if s.weight is not None else {"epochs": s.epochs})} for s in self.sources],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def describe(self) -> dict:
        """A JSON-able summary (for run records and `ettin batches`)."""
        return {
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rows_per_epoch": self.rows_per_epoch,
            "tokens_per_epoch": self.tokens_per_epoch,
            "tokenizer_hash": self.tokenizer_hash,
            "sources": [s.describe() for s in self.sources],
        }

    # -- epochs -------------------------------------------------------------------------------
    def epoch_documents(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global document ids in stream order, cumulative token offsets [len + 1]) of an epoch."""
        with self._lock:
            hit = self._cache.get(epoch)
            if hit is not None:
                self._cache.move_to_end(epoch)
                return hit
        built = self._build_epoch(epoch)
        with self._lock:
            self._cache[epoch] = built
            while len(self._cache) > self._cache_epochs:
                self._cache.popitem(last=False)
        return built

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for i, src in enumerate(self.sources):
            n, total = src.data.num_documents, src.data.num_tokens
            full, rem = divmod(src.target_tokens, total)
            ids = np.arange(src.doc_base, src.doc_base + n, dtype=np.int64)
            if full:
                parts.append(np.tile(ids, full))
            if rem:
                order = permutation(stream_key(self.seed, epoch, _TAG_SUBSET, i), n)
                cum = np.cumsum(src.data.doc_len[order])
                m = int(np.searchsorted(cum, rem, side="left")) + 1
                parts.append(ids[order[:m]])
        docs = np.concatenate(parts)
        docs = docs[permutation(stream_key(self.seed, epoch, _TAG_SHUFFLE), len(docs))]
        cum = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(self._doc_len[docs], out=cum[1:])
        assert cum[-1] >= self.tokens_per_epoch
        return docs, cum

    # -- rows ---------------------------------------------------------------------------------
    def rows(self, start: int, count: int, *, out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start .. start + count - 1`` of the global order: (input_ids int64 [count, seq_len],
        doc_ids int32 [count, seq_len]). ``out`` may supply C-contiguous arrays to fill."""
        start, count = int(start), int(count)
        if start < 0 or count < 0:
            raise EttinError(f"rows: start and count must be non-negative, got {start}, {count}")
        L, R = self.seq_len, self.rows_per_epoch
        if out is None:
            ids = np.empty((count, L), dtype=np.int64)
            dids = np.empty((count, L), dtype=np.int32)
        else:
            ids, dids = out
            if ids.shape != (count, L) or dids.shape != (count, L) or ids.dtype != np.int64 or dids.dtype != np.int32 or not (ids.flags.c_contiguous and dids.flags.c_contiguous):
                raise ValueError(f"rows(out=...): need C-contiguous int64 and int32 arrays of shape {(count, L)}")
        if count == 0:
            return ids, dids
        flat = ids.reshape(-1)
        marks = dids.reshape(-1)
        marks.fill(0)
        r, pos = start, 0
        end = start + count
        while r < end:
            epoch, j = divmod(r, R)
            n = min(end - r, R - j)
            docs, cum = self.epoch_documents(epoch)
            a, b = j * L, (j + n) * L
            d0 = int(np.searchsorted(cum, a, side="right")) - 1
            d1 = int(np.searchsorted(cum, b, side="left"))
            seg = docs[d0:d1]
            lo = np.maximum(cum[d0:d1], a)
            hi = np.minimum(cum[d0 + 1 : d1 + 1], b)
            src = self._doc_start[seg] + (lo - cum[d0:d1])
            dst = lo - a + pos
            ln = hi - lo
            self._gather(flat, pos, n * L, self._doc_shard[seg], src, dst, ln)
            marks[dst] = 1
            r += n
            pos += n * L
        dids[:, 0] = 1
        np.cumsum(dids, axis=1, out=dids)
        dids -= 1
        return ids, dids

    def _gather(self, flat, pos, size, shard, src, dst, ln) -> None:
        if len(ln) * 48 <= size:  # long pieces: one slice copy each
            shards = self._shards
            for k, s, d, n in zip(shard.tolist(), src.tolist(), dst.tolist(), ln.tolist()):
                flat[d : d + n] = shards[k][s : s + n]
            return
        # many short documents: one vectorised gather per shard
        idx = np.repeat(src - dst, ln)
        idx += np.arange(pos, pos + size, dtype=np.int64)
        if self._single_shard:
            flat[pos : pos + size] = self._shards[0][idx]
            return
        sid = np.repeat(shard, ln)
        for k in np.unique(shard).tolist():
            where = np.flatnonzero(sid == k)
            flat[pos + where] = self._shards[k][idx[where]]

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        ids, dids = self.rows(r, 1)
        return ids[0], dids[0]

    def batch_hash(self, start: int, count: int) -> str:
        return batch_hash(self.rows(start, count)[0])
