"""Prepared data directories: token shards, document offsets, manifest; reading and verifying.

Layout of DATA_DIR (written by ``ettin data prepare``; never modified afterwards)::

    DATA_DIR/manifest.json          see below
    DATA_DIR/tokens-00000.bin       token ids, raw little-endian uint16 (or uint32 when the
                                    padded vocabulary exceeds 65,536), documents back to back,
                                    each one "[CLS] text [SEP]"
    DATA_DIR/offsets-00000.bin      int64 little-endian, num_documents + 1 entries: document d
                                    of the shard is tokens[offsets[d]:offsets[d + 1]]
    DATA_DIR/tokenizer/             a copy of the tokenizer directory used

A document never spans two shards. ``manifest.json``::

    {"format": "ettin-data", "version": 1, "name": ..., "dtype": "uint16",
     "documents": D, "tokens": T, "skipped_empty": n, "text_field": "text", "text_unit": "file",
     "tokenizer": {"hash", "vocab_size", "real_vocab_size", "cls_id", "sep_id", "pad_id", "mask_id"},
     "inputs": [{"path", "kind", "bytes", "sha256", "documents", "tokens"}, ...],
     "shards": [{"tokens_file", "offsets_file", "documents", "tokens",
                 "tokens_bytes", "offsets_bytes", "tokens_sha256", "offsets_sha256"}, ...],
     "fingerprint": sha256 over format, dtype, tokenizer hash and every shard's counts and hashes}

The fingerprint depends on the token content only (not on paths, names, input formats or
worker count), so the same texts prepared twice give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ettin.errors import EttinError

FORMAT = "ettin-data"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens (512 MB as uint16) per shard


def shard_names(i: int) -> tuple[str, str]:
    return f"tokens-{i:05d}.bin", f"offsets-{i:05d}.bin"


def fingerprint(manifest: dict) -> str:
    core = {
        "format": manifest["format"],
        "version": manifest["version"],
        "dtype": manifest["dtype"],
        "tokenizer": manifest["tokenizer"]["hash"],
        "shards": [[s["documents"], s["tokens"], s["tokens_sha256"], s["offsets_sha256"]] for s in manifest["shards"]],
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ShardWriter:
    """Append documents (already tokenized) to shards in ``root``; documents never span shards."""

    def __init__(self, root: Path, dtype: str, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens <= 0:
            raise EttinError(f"--shard-tokens must be positive, got {shard_tokens}")
        self.root = Path(root)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0
        self._open = False

    def _start(self) -> None:
        i = len(self.shards)
        tname, oname = shard_names(i)
        self._tf = open(self.root / tname, "wb")
        self._of = open(self.root / oname, "wb")
        self._th, self._oh = hashlib.sha256(), hashlib.sha256()
        self._cur = {"tokens_file": tname, "offsets_file": oname, "documents": 0, "tokens": 0}
        self._write_offsets(np.zeros(1, dtype="<i8"))
        self._open = True

    def _write_offsets(self, arr: np.ndarray) -> None:
        b = np.ascontiguousarray(arr, dtype="<i8").tobytes()
        self._of.write(b)
        self._oh.update(b)

    def _finish(self) -> None:
        if not self._open:
            return
        for f in (self._tf, self._of):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        c = self._cur
        c["tokens_bytes"] = c["tokens"] * self.dtype.itemsize
        c["offsets_bytes"] = (c["documents"] + 1) * 8
        c["tokens_sha256"] = self._th.hexdigest()
        c["offsets_sha256"] = self._oh.hexdigest()
        self.shards.append(c)
        self._open = False

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` back to back, ``lengths`` their lengths (each > 0)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        start = 0  # token position in `tokens`
        d = 0  # document position in `lengths`
        while d < len(lengths):
            if not self._open:
                self._start()
            room = self.shard_tokens - self._cur["tokens"]
            ends = np.cumsum(lengths[d:])
            k = int(np.searchsorted(ends, room, side="right"))  # documents that fit
            if k == 0:
                if self._cur["documents"] > 0:
                    self._finish()
                    continue
                k = 1  # one document larger than a shard: it gets a shard of its own
            n_tok = int(ends[k - 1])
            piece = tokens[start : start + n_tok]
            b = piece.tobytes()
            self._tf.write(b)
            self._th.update(b)
            self._write_offsets(self._cur["tokens"] + ends[:k])
            self._cur["documents"] += k
            self._cur["tokens"] += n_tok
            self.documents += k
            self.tokens += n_tok
            start += n_tok
            d += k
            if self._cur["tokens"] >= self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        if self._open:
            self._tf.close()
            self._of.close()
            self._open = False


# -- reading --------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict:
    root = Path(path)
    if not root.exists():
        raise EttinError(f"{root}: data directory not found")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise EttinError(f"{root}: not a prepared data directory (no {MANIFEST}; run 'ettin data prepare')")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{mpath}: invalid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EttinError(f"{mpath}: not an ettin data manifest (format should be '{FORMAT}')")
    if m.get("version") != VERSION:
        raise EttinError(f"{mpath}: unsupported version {m.get('version')!r} (this ettin reads version {VERSION})")
    for key in ("dtype", "documents", "tokens", "shards", "tokenizer", "fingerprint"):
        if key not in m:
            raise EttinError(f"{mpath}: missing key '{key}'")
    if m["dtype"] not in ("uint16", "uint32"):
        raise EttinError(f"{mpath}: 'dtype' must be uint16 or uint32, got {m['dtype']!r}")
    _check_manifest_fields(root, m, mpath)
    return m


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


def _check_manifest_fields(root: Path, m: dict, mpath: Path) -> None:
    """Types of the fields we read, and shard files that stay inside DATA_DIR (an untrusted
    manifest must not make training read ``../../etc/passwd`` or follow a symlink out)."""
    from ettin.safety import inside

    for key in ("documents", "tokens"):
        if not _nonneg_int(m[key]):
            raise EttinError(f"{mpath}: '{key}' must be a non-negative integer, got {m[key]!r}")
    if not isinstance(m["shards"], list):
        raise EttinError(f"{mpath}: 'shards' must be a list")
    t = m["tokenizer"]
    if not isinstance(t, dict) or not isinstance(t.get("hash"), str):
        raise EttinError(f"{mpath}: 'tokenizer' must be an object with a 'hash'")
    for key in ("vocab_size", "real_vocab_size", "cls_id", "sep_id", "pad_id", "mask_id"):
        if key in t and not _nonneg_int(t[key]):
            raise EttinError(f"{mpath}: 'tokenizer.{key}' must be a non-negative integer, got {t[key]!r}")
    if not isinstance(m["fingerprint"], str):
        raise EttinError(f"{mpath}: 'fingerprint' must be a string")
    for i, sh in enumerate(m["shards"]):
        if not isinstance(sh, dict):
            raise EttinError(f"{mpath}: 'shards[{i}]' must be an object")
        for key in ("documents", "tokens", "tokens_bytes", "offsets_bytes"):
            if not _nonneg_int(sh.get(key)):
                raise EttinError(f"{mpath}: 'shards[{i}].{key}' must be a non-negative integer, got {sh.get(key)!r}")
        for key in ("tokens_sha256", "offsets_sha256"):
            if not isinstance(sh.get(key), str):
                raise EttinError(f"{mpath}: 'shards[{i}].{key}' must be a string")
        for key in ("tokens_file", "offsets_file"):
            inside(root, sh.get(key), f"'shards[{i}].{key}'", mpath)


class TokenData:
    """A prepared data directory opened for reading: memory-mapped shards plus a document table.

    ``doc_shard[d]``, ``doc_start[d]`` and ``doc_len[d]`` locate document d (global numbering
    in shard order); ``shard_tokens[k]`` is shard k's token array (a read-only memmap view).
    Opening does the cheap checks only, every time training opens the data: shard paths stay
    inside DATA_DIR, every file's size matches the manifest (a truncated shard is refused) and
    the document offsets are consistent; the trainer also checks each batch's ids against the
    model's vocabulary. :func:`verify` (``ettin data verify``) reads everything: content hashes,
    fingerprint, and every token id below the vocabulary size.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.fingerprint = m["fingerprint"]
        self.tokenizer_hash = m["tokenizer"]["hash"]
        self.tokenizer_dir = self.path / TOKENIZER_SUBDIR
        self.num_documents = int(m["documents"])
        self.num_tokens = int(m["tokens"])
        self.shard_tokens: list[np.ndarray] = []
        starts, lens, shard_ids = [], [], []
        for k, s in enumerate(m["shards"]):
            tpath, opath = self.path / s["tokens_file"], self.path / s["offsets_file"]
            _check_size(tpath, s["tokens_bytes"])
            _check_size(opath, s["offsets_bytes"])
            if s["tokens"]:
                toks = np.memmap(tpath, dtype=self.dtype, mode="r")
                self.shard_tokens.append(toks.view(np.ndarray))
            else:
                self.shard_tokens.append(np.zeros(0, dtype=self.dtype))
            offs = np.fromfile(opath, dtype="<i8")
            if offs[0] != 0 or offs[-1] != s["tokens"] or len(offs) != s["documents"] + 1 or np.any(np.diff(offs) <= 0):
                raise EttinError(f"{opath}: document offsets do not match the manifest (altered? run 'ettin data verify')")
            starts.append(offs[:-1])
            lens.append(np.diff(offs))
            shard_ids.append(np.full(s["documents"], k, dtype=np.int32))
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.doc_len = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.doc_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        if len(self.doc_len) != self.num_documents or int(self.doc_len.sum()) != self.num_tokens:
            raise EttinError(f"{self.path / MANIFEST}: document/token counts disagree with the shards")

    def document(self, d: int) -> np.ndarray:
        """Token ids of document d (int64 copy)."""
        if not 0 <= d < self.num_documents:
            raise IndexError(d)
        k, s, n = int(self.doc_shard[d]), int(self.doc_start[d]), int(self.doc_len[d])
        return self.shard_tokens[k][s : s + n].astype(np.int64)


def _check_size(path: Path, expected: int) -> None:
    if not path.is_file():
        raise EttinError(f"{path}: shard file missing")
    size = path.stat().st_size
    if size != expected:
        raise EttinError(f"{path}: {size} bytes but the manifest says {expected} (truncated or altered; re-run 'ettin data prepare')")


def verify(path: str | os.PathLike, *, on_bytes=None) -> dict:
    """Re-hash every shard and compare with the manifest; returns the manifest. Raises EttinError."""
    from ettin.fsutil import sha256_file

    root = Path(path)
    m = read_manifest(root)
    for s in m["shards"]:
        for kind in ("tokens", "offsets"):
            f = root / s[f"{kind}_file"]
            _check_size(f, s[f"{kind}_bytes"])
            got = sha256_file(f)
            if got != s[f"{kind}_sha256"]:
                raise EttinError(f"{f}: sha256 {got[:16]}... differs from the manifest's {s[f'{kind}_sha256'][:16]}... (the shard was altered; re-run 'ettin data prepare')")
            if on_bytes is not None:
                on_bytes(s[f"{kind}_bytes"])
    vocab = m["tokenizer"].get("vocab_size")
    if isinstance(vocab, int):
        dtype = np.dtype(m["dtype"]).newbyteorder("<")
        for s in m["shards"]:
            f = root / s["tokens_file"]
            if not s["tokens"]:
                continue
            toks = np.memmap(f, dtype=dtype, mode="r")
            step = 1 << 24
            for a in range(0, len(toks), step):
                part = toks[a : a + step]
                if int(part.max()) >= vocab:
                    pos = a + int(np.argmax(part >= vocab))
                    raise EttinError(f"{f}: token id {int(toks[pos])} at position {pos} is outside the vocabulary of {vocab} (corrupt or altered shard)")
            del toks
    if fingerprint(m) != m["fingerprint"]:
        raise EttinError(f"{root / MANIFEST}: fingerprint does not match the shard list (manifest edited?)")
    if sum(s["documents"] for s in m["shards"]) != m["documents"] or sum(s["tokens"] for s in m["shards"]) != m["tokens"]:
        raise EttinError(f"{root / MANIFEST}: document/token totals disagree with the shard list")
    tdir = root / TOKENIZER_SUBDIR
    if not (tdir / "tokenizer.json").is_file():
        raise EttinError(f"{tdir}: tokenizer copy missing")
    from ettin.data.tokenizer import tokenizer_hash

    if tokenizer_hash(tdir) != m["tokenizer"]["hash"]:
        raise EttinError(f"{tdir}: tokenizer differs from the one the data was prepared with (hash mismatch)")
    return m
