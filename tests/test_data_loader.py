"""PrefetchLoader: same batches as Mixture.rows, in order, from a background thread."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ettin.data.loader import PrefetchLoader, iterate_rows  # noqa: E402
from ettin.data.mixture import Mixture, batch_hash  # noqa: E402
from ettin.data.prepare import prepare  # noqa: E402
from ettin.errors import EttinError  # noqa: E402


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("loader")
    vocab = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, "[MASK]": 3, "[UNK]": 4, **{f"w{i}": 5 + i for i in range(50)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (root / "tok").mkdir()
    tk.save(str(root / "tok" / "tokenizer.json"))
    rng = random.Random(0)
    (root / "in.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(50)}" for _ in range(rng.randint(1, 90)))}) + "\n" for _ in range(200)))
    prepare([root / "in.jsonl"], root / "tok", root / "data", workers=1)
    return Mixture([{"path": root / "data"}], 32, 7)


def ranges_for(mix, sizes, start=0):
    out = []
    for n in sizes:
        out.append((start, n))
        start += n
    return out


def test_loader_matches_rows(mix):
    R = mix.rows_per_epoch
    ranges = ranges_for(mix, [4, 8, 16, 16, 3, R], start=R - 20)
    got = list(PrefetchLoader(mix, ranges, pin_memory=True, depth=2))
    assert len(got) == len(ranges)
    for (ids, dids), (s, c) in zip(got, ranges):
        assert ids.dtype == torch.int64 and dids.dtype == torch.int32 and tuple(ids.shape) == (c, 32)
        want_ids, want_dids = mix.rows(s, c)
        assert np.array_equal(ids.numpy(), want_ids) and np.array_equal(dids.numpy(), want_dids)
        assert batch_hash(ids) == batch_hash(want_ids)
    assert [batch_hash(a) for a, _ in iterate_rows(mix, ranges)] == [batch_hash(a) for a, _ in got]


def test_early_stop_and_reuse(mix):
    before = threading.active_count()
    loader = PrefetchLoader(mix, [(i * 4, 4) for i in range(1000)], depth=3)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    loader.close()
    assert threading.active_count() <= before
    first = next(iter(PrefetchLoader(mix, [(0, 4)])))
    assert np.array_equal(first[0].numpy(), mix.rows(0, 4)[0])
    with PrefetchLoader(mix, [(0, 2), (2, 2)]) as ld:
        assert len(list(ld)) == 2 and len(list(ld)) == 2  # iterable more than once


def test_errors_reach_the_consumer(mix):
    loader = PrefetchLoader(mix, [(0, 2), (-5, 2)])
    it = iter(loader)
    next(it)
    with pytest.raises(EttinError, match="non-negative"):
        next(it)
