"""Tokenizers: training, special ids, padding, foreign tokenizer directories, CLI."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.data import tokenizer as T
from ettin.errors import EttinError

WORDS = "the of and a to in is was he for it with as his on be at by I had not are but from or have an they which one you were her all she there would their we him been has when who will more no if out so said what up its about into than them can only other new some could time these two may then do first any my now such like our over man me even most made after also did many before must through back years where much your way well down should because each just those people Mr how too little state good very make world still own see men work long get here between both life being under never day same another know while last might us great old year off come since against go came right used take three café naïve Zürich 東京 ünïcödé".split()


def make_texts(n: int, seed: int = 0, lo: int = 5, hi: int = 80) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, k), "\n\n")
        out.append(" ".join(words).replace(" \n\n ", "\n\n").strip())
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    T.train_tokenizer(make_texts(400), d, 400)
    return d


def test_specials_and_padding(tok_dir):
    tok = T.load_tokenizer(tok_dir)
    for i, name in enumerate(("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")):
        assert tok.token_to_id(name) == i
    assert T.special_ids(tok_dir) == {"cls_id": 0, "sep_id": 1, "pad_id": 2, "mask_id": 3}
    real = T.real_vocab_size(tok_dir)
    over = T.model_overrides(tok_dir)
    assert real <= 400 and real == tok.get_vocab_size()
    assert over["vocab_size"] % 64 == 0 and over["vocab_size"] >= real and over["vocab_size"] - real < 64
    assert over == {"vocab_size": over["vocab_size"], "cls_id": 0, "sep_id": 1, "pad_id": 2, "mask_id": 3}
    meta = json.loads((tok_dir / "ettin_tokenizer.json").read_text())
    assert meta["vocab_size"] == over["vocab_size"] and meta["real_vocab_size"] == real
    assert (tok_dir / "tokenizer_config.json").is_file()


def test_document_encoding_contract(tok_dir):
    tok = T.load_tokenizer(tok_dir)
    text = "the old man said café"
    ids = T.encode_document(tok, text, 0, 1)
    assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1] and 1 not in ids[1:-1]
    assert tok.encode(text).ids == ids  # the post-processor wraps the same way
    assert tok.decode(ids[1:-1]) == text  # byte-level: lossless


def test_training_is_deterministic_and_hash_sensitive(tmp_path, tok_dir):
    T.train_tokenizer(make_texts(400), tmp_path / "again", 400)
    assert T.tokenizer_hash(tmp_path / "again") == T.tokenizer_hash(tok_dir)
    T.train_tokenizer(make_texts(400), tmp_path / "other", 384)
    assert T.tokenizer_hash(tmp_path / "other") != T.tokenizer_hash(tok_dir)
    # reformatting tokenizer.json does not change the hash
    d = tmp_path / "reformatted"
    d.mkdir()
    for f in tok_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "tokenizer.json").write_text(json.dumps(json.loads((tok_dir / "tokenizer.json").read_text()), indent=None))
    assert T.tokenizer_hash(d) == T.tokenizer_hash(tok_dir)


def _foreign(tmp_path, names, *, config=None, extra=0):
    """A tokenizer.json directory laid out like a third-party one (specials at the end)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100 + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(names)
    d = tmp_path / "foreign"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_foreign_tokenizer_like_modernbert(tmp_path):
    names = ["|||IP|||", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    d = _foreign(tmp_path, names, config={"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]"})
    assert T.special_ids(d) == {"cls_id": 102, "sep_id": 103, "pad_id": 104, "mask_id": 105}
    assert T.model_overrides(d)["vocab_size"] == 128
    assert T.real_vocab_size(d) == 106


def test_foreign_tokenizer_roberta_names_without_config(tmp_path):
    d = _foreign(tmp_path, ["<s>", "<pad>", "</s>", "<mask>"])
    assert T.special_ids(d) == {"cls_id": 100, "sep_id": 102, "pad_id": 101, "mask_id": 103}


def test_foreign_tokenizer_without_mask_is_refused(tmp_path):
    d = _foreign(tmp_path, ["<s>", "<pad>", "</s>"])
    with pytest.raises(EttinError, match="no MASK token"):
        T.special_ids(d)


def test_bad_tokenizer_dirs(tmp_path):
    with pytest.raises(EttinError, match="not found"):
        T.load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EttinError, match="no tokenizer.json"):
        T.special_ids(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(EttinError, match="tokenizer.json"):
        T.load_tokenizer(tmp_path / "bad")


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(EttinError, match="vocab-size"):
        T.train_tokenizer(["abc"], tmp_path / "t", 100)
    assert not (tmp_path / "t").exists()


def test_check_model_compat(tok_dir):
    from ettin.config import preset

    over = T.model_overrides(tok_dir)
    T.check_model_compat(tok_dir, preset("micro", **over))
    with pytest.raises(EttinError, match="vocabulary"):
        T.check_model_compat(tok_dir, preset("micro", cls_id=0, sep_id=1, pad_id=2, mask_id=3, vocab_size=64))
    with pytest.raises(EttinError, match="mask_id"):
        T.check_model_compat(tok_dir, preset("micro", **{**over, "mask_id": 4}))


def test_cli_train_and_info(tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(200, seed=3)))
    runner = CliRunner()
    res = runner.invoke(app, ["tokenizer", "train", str(src), "--vocab-size", "320", "--out", str(tmp_path / "tok"), "-q"])
    assert res.exit_code == 0, res.output
    assert "model vocabulary 320" in res.output or "model vocabulary 384" in res.output
    res = runner.invoke(app, ["tokenizer", "info", str(tmp_path / "tok"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["cls_id"] == 0 and info["mask_id"] == 3 and info["vocab_size"] % 64 == 0
    res = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nope.jsonl"), "--vocab-size", "320", "--out", str(tmp_path / "t2")])
    assert isinstance(res.exception, EttinError) and "nope.jsonl" in str(res.exception)


def test_init_uses_tokenizer(tmp_path, tok_dir):
    res = CliRunner().invoke(app, ["init", "--size", "micro", "--kind", "encoder", "--out", str(tmp_path / "ck"), "--tokenizer", str(tok_dir)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "ck" / "ettin.json").read_text())["model"]
    assert cfg["vocab_size"] == T.model_overrides(tok_dir)["vocab_size"] and cfg["mask_id"] == 3


def test_transformers_can_load(tok_dir):
    transformers = pytest.importorskip("transformers")
    t = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert (t.cls_token_id, t.sep_token_id, t.pad_token_id, t.mask_token_id) == (0, 1, 2, 3)
    assert t("the old man")["input_ids"] == T.load_tokenizer(tok_dir).encode("the old man").ids
