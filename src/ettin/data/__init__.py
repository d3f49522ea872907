"""ettin.data: tokenizers, ``data prepare/verify``, token shards, mixtures, sample order, loader.

Modules: :mod:`~ettin.data.tokenizer` (train/load tokenizers, special ids),
:mod:`~ettin.data.readers` (input formats), :mod:`~ettin.data.prepare` (tokenize into shards),
:mod:`~ettin.data.shards` (data directory format, verify), :mod:`~ettin.data.mixture`
(recipes -> global row order, ``batch_hash``), :mod:`~ettin.data.loader` (prefetching loader),
:mod:`~ettin.data.commands` (CLI). Importing this package is cheap (no torch, no tokenizers).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["demo_corpus_path", "demo_heldout_path"]


def _asset(name: str) -> Path:
    ref = resources.files("ettin") / "assets" / name
    path = Path(str(ref))
    if not path.is_file():  # e.g. installed as a zip: materialise a copy
        import tempfile

        data = ref.read_bytes()
        path = Path(tempfile.gettempdir()) / f"ettin-{name}"
        if not path.is_file() or path.stat().st_size != len(data):
            path.write_bytes(data)
    return path


def demo_corpus_path() -> Path:
    """The bundled demo pretraining corpus (JSONL.gz, ~3 MB of public-domain English books)."""
    return _asset("demo_corpus.jsonl.gz")


def demo_heldout_path() -> Path:
    """Held-out documents from the same books as the demo corpus (JSONL.gz), for evaluation."""
    return _asset("demo_heldout.jsonl.gz")
