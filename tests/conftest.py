import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# oneDNN linears wherever torch has them (no per-machine probe, nothing written to ~/.cache)
os.environ.setdefault("ETTIN_LINEAR", "onednn")
# Progress lines appear once work takes 2 s, which a loaded CI machine reaches anywhere; tests that
# check output would then depend on speed. tests/test_progress.py turns it back on where it is tested.
os.environ.setdefault("ETTIN_QUIET", "1")
# Tiny models run fastest (and most reproducibly) on one thread; CI has 2 cores.
torch.set_num_threads(1)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture
def shared_data():
    path = os.path.abspath(os.path.join(SHARED, "data"))
    if not os.path.isdir(path):
        pytest.skip("../shared/data not present")
    return path


def demo_texts(n: int, chars: int) -> list[str]:
    """The first ``n`` documents of the shipped demo corpus, each cut to ``chars`` characters."""
    import gzip
    import json

    from ettin.data import demo_corpus_path

    texts = []
    with gzip.open(demo_corpus_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"][:chars])
            if len(texts) == n:
                break
    return texts


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared data directory (first documents of the shipped demo corpus, vocab 512)."""
    import json

    from ettin.data.prepare import prepare
    from ettin.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    texts = demo_texts(60, 4000)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(iter(texts), root / "tok", 512)
    prepare([corpus], root / "tok", root / "data", workers=1)
    return root / "data"


def write_recipe(path, data_dir, **over):
    """A tiny one-stage recipe; ``over`` maps dotted keys to values."""
    import yaml

    d = {
        "name": "stage1",
        "model": {"size": "micro", "kind": "encoder"},
        "data": {"sources": [{"path": str(data_dir), "weight": 1.0}]},
        "train": {"tokens": 16 * 8 * 32, "seq_len": 32, "global_batch": 8, "micro_batch": 4, "mask_rate": 0.3, "seed": 21, "rope_theta": 10000},
        "optim": {"lr": 3e-3, "schedule": {"kind": "warmup_constant", "warmup_tokens": 512}},
        "checkpoint": {"every_tokens": 4 * 8 * 32},
        "logging": {"tensorboard": False},
    }
    for k, v in over.items():
        cur = d
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A tiny word-level tokenizer for evaluation tests."""
    from ettin.eval.testing import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A tiny evaluation data directory in the layout of ../shared/data."""
    from ettin.eval.testing import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("data") / "data")
