"""Hashes shared by the data pipeline, the trainer and ``ettin batches``."""

from __future__ import annotations

import hashlib

import numpy as np

_M64 = (1 << 64) - 1


def batch_hash(input_ids) -> str:
    """sha256 hex of the row-major int64 little-endian bytes of ``input_ids`` (numpy or torch)."""
    if hasattr(input_ids, "detach"):  # torch.Tensor, on any device
        input_ids = input_ids.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(input_ids), dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _splitmix_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key for a named random stream, e.g. ``stream_key(seed, epoch, tag)``."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix_int(h ^ (int(p) & _M64))
    return h


def hash_keys(key: int, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 values: splitmix64(key + i) for i < n. Pure integer arithmetic,
    so the values (and the permutations sorted from them) are identical on every platform and
    numpy version, unlike ``numpy.random``."""
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) + np.uint64(key)
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def permutation(key: int, n: int) -> np.ndarray:
    """A deterministic permutation of ``range(n)`` (int64) drawn from stream ``key``."""
    return np.argsort(hash_keys(key, n), kind="stable").astype(np.int64, copy=False)
