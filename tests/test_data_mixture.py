"""Mixtures and the global sample order: a pure function of (sources, weights, seq_len, seed, row)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import numpy as np
import pytest

from ettin.data.mixture import Mixture, batch_hash
from ettin.data.prepare import prepare
from ettin.data.shards import TokenData
from ettin.errors import EttinError

VOCAB = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, "[MASK]": 3, "[UNK]": 4, **{f"w{i}": 5 + i for i in range(200)}}


def make_tokenizer(path, vocab=VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True)
    tk.save(str(path / "tokenizer.json"))
    return path


def make_source(root, name, n_docs, seed, lo=1, hi=150, tok=None):
    """A prepared source of n_docs documents with lengths lo..hi words (+2 specials)."""
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(200)}" for _ in range(rng.randint(lo, hi))) for _ in range(n_docs)]
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = tok or root / "tok"
    if not tok.exists():
        make_tokenizer(tok)
    prepare([src], tok, root / name, workers=1)
    return root / name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {"a": make_source(root, "a", 120, 1), "b": make_source(root, "b", 40, 2, lo=100, hi=400), "root": root}


def test_same_seed_same_rows_different_seed_different(data):
    m1 = Mixture([{"path": data["a"]}], 64, 21)
    m2 = Mixture([{"path": str(data["a"])}], 64, 21)
    m3 = Mixture([{"path": data["a"]}], 64, 22)
    assert m1.fingerprint == m2.fingerprint != m3.fingerprint
    for s, c in [(0, 8), (37, 5), (m1.rows_per_epoch - 2, 6), (5 * m1.rows_per_epoch + 3, 4)]:
        assert batch_hash(m1.rows(s, c)[0]) == batch_hash(m2.rows(s, c)[0])
    assert batch_hash(m1.rows(0, 8)[0]) != batch_hash(m3.rows(0, 8)[0])


def test_regrouping_never_reorders(data):
    mix = Mixture([{"path": data["a"], "weight": 2}, {"path": data["b"], "weight": 1}], 48, 5)
    R = mix.rows_per_epoch
    start, total = R - 17, 45  # crosses the epoch boundary
    ids, dids = mix.rows(start, total)
    for sizes in ([45], [1] * 45, [7, 13, 20, 5], [17, 28], [3, 1, 40, 1]):
        parts, pos = [], start
        for n in sizes:
            parts.append(mix.rows(pos, n))
            pos += n
        assert np.array_equal(np.concatenate([p[0] for p in parts]), ids)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), dids)
    # world size / accumulation: rank r of W takes rows [base + r*n, ...) of the same global range
    world = [mix.rows(start + r * 15, 15)[0] for r in range(3)]
    assert np.array_equal(np.concatenate(world), ids)


def test_epochs_cover_every_document_once(data):
    td = TokenData(data["a"])
    L = 32
    mix = Mixture([{"path": data["a"]}], L, 3)
    R = mix.rows_per_epoch
    assert R == td.num_tokens // L
    for epoch in (0, 1):
        docs, cum = mix.epoch_documents(epoch)
        assert sorted(docs.tolist()) == list(range(td.num_documents))
        stream = np.concatenate([td.document(int(d)) for d in docs])[: R * L]
        ids, _ = mix.rows(epoch * R, R)
        assert np.array_equal(ids.reshape(-1), stream)
    assert not np.array_equal(mix.epoch_documents(0)[0], mix.epoch_documents(1)[0])
    # first row of epoch 1 starts with the first document of epoch 1's order
    first = td.document(int(mix.epoch_documents(1)[0][0]))
    assert np.array_equal(mix.rows(R, 1)[0][0][: min(L, len(first))], first[:L])


def test_doc_ids_follow_cls_sep(data):
    mix = Mixture([{"path": data["a"]}, {"path": data["b"]}], 40, 9)
    ids, dids = mix.rows(0, 200)
    assert ids.dtype == np.int64 and dids.dtype == np.int32 and ids.shape == (200, 40)
    assert (dids[:, 0] == 0).all()
    step = np.diff(dids, axis=1)
    assert set(np.unique(step).tolist()) <= {0, 1}  # consecutive segment numbers 0, 1, 2 ...
    new_seg = np.zeros_like(ids, dtype=bool)
    new_seg[:, 1:] = step == 1
    # inside a row a new segment starts exactly where a [CLS] is, right after a [SEP]
    assert np.array_equal(new_seg, (ids == 0) & (np.arange(40) > 0))
    assert (ids[:, :-1][new_seg[:, 1:]] == 1).all()
    # a row starting mid-document continues it without a [CLS]: previous row ended inside it
    cont = ids[1:, 0] != 0
    assert (ids[:-1, -1][cont] != 1).all()


def test_short_documents_vectorised_path(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    a = make_source(tmp_path, "s", 500, 4, lo=1, hi=4, tok=tok)
    b = make_source(tmp_path, "t", 300, 5, lo=1, hi=3, tok=tok)
    mix = Mixture([{"path": a}, {"path": b, "epochs": 2}], 64, 1)
    ids, dids = mix.rows(3, 20)
    # reference built document by document
    docs, cum = mix.epoch_documents(0)
    tds = [TokenData(a), TokenData(b)]
    n_a = tds[0].num_documents
    stream = np.concatenate([tds[0].document(int(d)) if d < n_a else tds[1].document(int(d) - n_a) for d in docs])
    assert np.array_equal(ids.reshape(-1), stream[3 * 64 : 23 * 64])
    assert dids.max() > 5


def test_weights_set_token_shares(data):
    ta, tb = TokenData(data["a"]).num_tokens, TokenData(data["b"]).num_tokens
    mix = Mixture([{"path": data["a"], "weight": 3}, {"path": data["b"], "weight": 1}], 64, 0)
    docs, cum = mix.epoch_documents(0)
    n_a = TokenData(data["a"]).num_documents
    lens = np.diff(cum)
    share_a = lens[docs < n_a].sum() / lens.sum()
    assert abs(share_a - 0.75) < 0.02
    assert mix.rows_per_epoch == (int(np.ceil(0.75 * (ta + tb))) + int(np.ceil(0.25 * (ta + tb)))) // 64
    # different epochs pick a different subset for the fractional part
    assert sorted(mix.epoch_documents(0)[0].tolist()) != sorted(mix.epoch_documents(1)[0].tolist())


def test_epochs_repeat_and_fraction(data):
    n_b = TokenData(data["b"]).num_documents
    n_a = TokenData(data["a"]).num_documents
    mix = Mixture([{"path": data["a"], "epochs": 0.5}, {"path": data["b"], "epochs": 2}], 64, 0)
    docs, _ = mix.epoch_documents(0)
    counts = np.bincount(docs, minlength=n_a + n_b)
    assert (counts[n_a:] == 2).all()
    a_tokens = TokenData(data["a"]).doc_len[np.flatnonzero(counts[:n_a])].sum()
    assert counts[:n_a].max() == 1 and 0.5 * TokenData(data["a"]).num_tokens <= a_tokens < 0.5 * TokenData(data["a"]).num_tokens + 160


def test_weights_mixed_with_epochs(data):
    tb = TokenData(data["b"]).num_tokens
    mix = Mixture([{"path": data["a"], "weight": 0.25}, {"path": data["b"], "epochs": 1}], 64, 0)
    assert [s.target_tokens for s in mix.sources] == [int(np.ceil(0.25 * tb / 0.75)), tb]
    with pytest.raises(EttinError, match="sum to < 1"):
        Mixture([{"path": data["a"], "weight": 1}, {"path": data["b"], "epochs": 1}], 64, 0)


def test_fingerprint_depends_on_content_not_location(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data["a"], copy)
    base = Mixture([{"path": data["a"]}], 64, 1)
    assert Mixture([{"path": copy, "name": "renamed"}], 64, 1).fingerprint == base.fingerprint
    assert Mixture([{"path": data["a"]}], 32, 1).fingerprint != base.fingerprint
    assert Mixture([{"path": data["a"], "epochs": 2}], 64, 1).fingerprint != base.fingerprint
    assert base.tokenizer_dir == data["a"] / "tokenizer" and (base.tokenizer_dir / "tokenizer.json").is_file()


def test_bad_recipes(data, tmp_path):
    with pytest.raises(EttinError, match="missing-source"):
        Mixture([{"path": tmp_path / "missing-source", "weight": 1}], 64, 0)
    with pytest.raises(EttinError, match="unknown key 'wieght'"):
        Mixture([{"path": data["a"], "wieght": 1}], 64, 0)
    with pytest.raises(EttinError, match="not both"):
        Mixture([{"path": data["a"], "weight": 1, "epochs": 1}], 64, 0)
    with pytest.raises(EttinError, match="positive"):
        Mixture([{"path": data["a"], "weight": 0}], 64, 0)
    with pytest.raises(EttinError, match="seq_len"):
        Mixture([{"path": data["a"]}], 0, 0)
    with pytest.raises(EttinError, match="fewer than one row"):
        Mixture([{"path": data["a"]}], 10**9, 0)
    with pytest.raises(EttinError, match="at least one source"):
        Mixture([], 64, 0)
    (tmp_path / "not-data").mkdir()
    with pytest.raises(EttinError, match="not a prepared data directory"):
        Mixture([{"path": tmp_path / "not-data"}], 64, 0)


def test_different_tokenizers_refused(data, tmp_path):
    other = make_source(tmp_path, "o", 10, 3, tok=make_tokenizer(tmp_path / "tok2", {**VOCAB, "extra": 300}))
    with pytest.raises(EttinError, match="different tokenizer"):
        Mixture([{"path": data["a"]}, {"path": other}], 64, 0)


def test_truncated_source_refused(data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data["a"], copy)
    f = copy / "tokens-00000.bin"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(EttinError, match="truncated"):
        Mixture([{"path": copy}], 64, 0)


def test_batch_hash_definition():
    torch = pytest.importorskip("torch")
    x = np.array([[1, 2, 3], [4, 5, 70000]], dtype=np.int32)
    want = hashlib.sha256(np.array([[1, 2, 3], [4, 5, 70000]], dtype="<i8").tobytes()).hexdigest()
    assert batch_hash(x) == want == batch_hash(torch.tensor(x).long()) == batch_hash(x.tolist())
    assert batch_hash(torch.tensor(x)[:, :2].T) == hashlib.sha256(np.ascontiguousarray(x[:, :2].T, dtype="<i8").tobytes()).hexdigest()


def test_order_is_pinned(tmp_path):
    """Golden values: a change here changes the sample order of every recorded run."""
    tok = make_tokenizer(tmp_path / "tok")
    a = make_source(tmp_path, "a", 30, 1, tok=tok)
    b = make_source(tmp_path, "b", 20, 2, tok=tok)
    mix = Mixture([{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3}], 16, 21)
    assert mix.rows_per_epoch == 192
    assert mix.rows(0, 1)[0][0, :6].tolist() == GOLDEN_ROW0
    assert batch_hash(mix.rows(100, 200)[0]) == GOLDEN_HASH


GOLDEN_ROW0 = [0, 134, 204, 177, 46, 135]
GOLDEN_HASH = "6c9c595d288ed7dc2d71b86248dbfa1b7dfa9e093d356f84e0cec73e894309c6"
