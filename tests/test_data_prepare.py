"""``data prepare`` / ``verify``: every input format gives the tokens of direct encoding; bad input
gives one-line errors and leaves no DATA_DIR behind."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from ettin.cli import app
from ettin.data import tokenizer as T
from ettin.data.prepare import prepare
from ettin.data.shards import TokenData, read_manifest, verify
from ettin.errors import EttinError

WORDS = "the of and a to in is was he for it with as his on be at by had not are but from or have an they which one you were her all she there would their we him been has when who will more no if out so said what up its about into than them can only other new some could time café naïve 東京 ünïcödé".split()


def texts_for(n, seed=1, blank_lines=True, newlines=True):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 60))]
        text = " ".join(words)
        if newlines and rng.random() < 0.3:
            text = text.replace(" was ", "\nwas ", 1)
        if blank_lines and rng.random() < 0.3:
            text = text.replace(" the ", "\n\nthe ", 1)
        out.append(text)
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tok"
    T.train_tokenizer(texts_for(300, seed=7), d, 320)
    return d


def expected_docs(tok_dir, texts):
    tk = T.load_tokenizer(tok_dir)
    return [T.encode_document(tk, t, 0, 1) for t in texts]


def stored_docs(data_dir):
    td = TokenData(data_dir)
    return [td.document(i).tolist() for i in range(td.num_documents)]


def write_jsonl(path, texts, opener=open):
    with opener(path, "wb") as fh:
        for i, t in enumerate(texts):
            fh.write((json.dumps({"id": i, "text": t, "meta": {"n": i}}, ensure_ascii=i % 2 == 0) + "\n").encode())
            if i % 7 == 3:
                fh.write(b"\n")  # blank lines are skipped
    return path


def write_zst(path, texts):
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    return path


def write_parquet(path, texts, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=17)
    return path


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt-dir"])
def test_formats_match_direct_encoding(tmp_path, tok, fmt):
    texts = texts_for(60)
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "in.jsonl", texts)
    elif fmt == "jsonl.gz":
        src = write_jsonl(tmp_path / "in.jsonl.gz", texts, opener=gzip.open)
    elif fmt == "jsonl.zst":
        src = write_zst(tmp_path / "in.jsonl.zst", texts)
    elif fmt == "parquet":
        src = write_parquet(tmp_path / "in.parquet", texts)
    else:
        src = tmp_path / "txt"
        src.mkdir()
        for i, t in enumerate(texts):
            (src / f"doc-{i:04d}.txt").write_text(t + "\n", encoding="utf-8")
    m = prepare([src], tok, tmp_path / "out", workers=1, chunk_bytes=700)
    assert stored_docs(tmp_path / "out") == expected_docs(tok, texts)
    assert m["documents"] == len(texts)
    assert m["tokens"] == sum(len(d) for d in expected_docs(tok, texts))
    assert m["dtype"] == "uint16"
    ins = m["inputs"]
    assert sum(i["documents"] for i in ins) == len(texts) and sum(i["tokens"] for i in ins) == m["tokens"]
    # the fingerprint depends on the tokens only: every format agrees
    ref = tmp_path / "ref.jsonl"
    write_jsonl(ref, texts)
    m2 = prepare([ref], tok, tmp_path / "ref", workers=1)
    assert m2["fingerprint"] == m["fingerprint"]
    assert read_manifest(tmp_path / "out") == {k: v for k, v in m.items() if k != "stats"}


def test_txt_units(tmp_path, tok):
    paras = texts_for(30, seed=4, blank_lines=False)
    (tmp_path / "p.txt").write_text("\n\n\n".join(paras) + "\n", encoding="utf-8")
    prepare([tmp_path / "p.txt"], tok, tmp_path / "para", workers=1, text_unit="paragraph")
    assert stored_docs(tmp_path / "para") == expected_docs(tok, paras)
    lines = texts_for(30, seed=5, blank_lines=False, newlines=False)
    (tmp_path / "l.txt").write_text("\r\n".join(lines) + "\r\n\r\n", encoding="utf-8")
    prepare([tmp_path / "l.txt"], tok, tmp_path / "line", workers=1, text_unit="line")
    assert stored_docs(tmp_path / "line") == expected_docs(tok, lines)


def test_datasets_directory(tmp_path, tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = texts_for(40, seed=9)
    datasets.Dataset.from_dict({"text": texts, "id": list(range(40))}).save_to_disk(str(tmp_path / "ds"))
    prepare([tmp_path / "ds"], tok, tmp_path / "a", workers=1)
    assert stored_docs(tmp_path / "a") == expected_docs(tok, texts)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "dd"))
    prepare([tmp_path / "dd"], tok, tmp_path / "b", workers=1)
    assert stored_docs(tmp_path / "b") == expected_docs(tok, texts)
    # without the datasets package the Arrow files are read directly
    monkeypatch.setitem(sys.modules, "datasets", None)
    prepare([tmp_path / "ds"], tok, tmp_path / "c", workers=1)
    assert stored_docs(tmp_path / "c") == expected_docs(tok, texts)
    with pytest.raises(EttinError, match="fields found: text, id"):
        prepare([tmp_path / "ds"], tok, tmp_path / "d", workers=1, text_field="body")


def test_mds_directory(tmp_path, tok):
    streaming = pytest.importorskip("streaming")
    texts = texts_for(40, seed=11)
    with streaming.MDSWriter(out=str(tmp_path / "mds"), columns={"text": "str", "id": "int"}, size_limit=2000) as w:
        for i, t in enumerate(texts):
            w.write({"text": t, "id": i})
    prepare([tmp_path / "mds"], tok, tmp_path / "out", workers=1)
    assert stored_docs(tmp_path / "out") == expected_docs(tok, texts)


def test_directory_input_and_workers_agree(tmp_path, tok):
    d = tmp_path / "in"
    d.mkdir()
    a, b = texts_for(50, seed=2), texts_for(50, seed=3)
    write_jsonl(d / "a.jsonl", a)
    write_jsonl(d / "b.jsonl.gz", b, opener=gzip.open)
    (d / "README.md").write_text("ignored")
    m1 = prepare([d], tok, tmp_path / "w1", workers=1, chunk_bytes=500)
    m2 = prepare([d], tok, tmp_path / "w2", workers=2, chunk_bytes=500)
    assert m1["fingerprint"] == m2["fingerprint"]
    assert [i["documents"] for i in m2["inputs"]] == [50, 50]
    assert stored_docs(tmp_path / "w2") == expected_docs(tok, a + b)


def test_shards_split_at_documents(tmp_path, tok):
    texts = texts_for(80, seed=6)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    m = prepare([src], tok, tmp_path / "out", workers=1, shard_tokens=150, chunk_bytes=300)
    assert len(m["shards"]) > 3
    assert stored_docs(tmp_path / "out") == expected_docs(tok, texts)
    for s in m["shards"]:
        offs = np.fromfile(tmp_path / "out" / s["offsets_file"], dtype="<i8")
        assert offs[-1] == s["tokens"] and (s["tokens"] <= 150 or s["documents"] == 1)
    assert verify(tmp_path / "out")["fingerprint"] == m["fingerprint"]


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, "[MASK]": 3, "[UNK]": 4, "small": 5, "big": 70000}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tk.save(str(tmp_path / "tok" / "tokenizer.json"))
    assert T.model_overrides(tmp_path / "tok")["vocab_size"] == 70016
    write_jsonl(tmp_path / "in.jsonl", ["small big", "big big what"])
    m = prepare([tmp_path / "in.jsonl"], tmp_path / "tok", tmp_path / "out", workers=1)
    assert m["dtype"] == "uint32"
    assert stored_docs(tmp_path / "out") == [[0, 5, 70000, 1], [0, 70000, 70000, 4, 1]]


def test_tokenizer_copy_and_progress(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setenv("ETTIN_PROGRESS_INTERVAL", "0.001")  # even a quick run prints its progress line
    monkeypatch.delenv("ETTIN_QUIET", raising=False)
    src = write_jsonl(tmp_path / "in.jsonl", texts_for(20))
    prepare([src], tok, tmp_path / "out", workers=1, progress=True, name="web")
    assert T.tokenizer_hash(tmp_path / "out" / "tokenizer") == T.tokenizer_hash(tok)
    assert read_manifest(tmp_path / "out")["name"] == "web"
    assert "tok/s" in capsys.readouterr().err


def test_existing_out_needs_overwrite(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", texts_for(10))
    prepare([src], tok, tmp_path / "out", workers=1)
    with pytest.raises(EttinError, match="--overwrite"):
        prepare([src], tok, tmp_path / "out", workers=1)
    prepare([src], tok, tmp_path / "out", workers=1, overwrite=True)
    verify(tmp_path / "out")
    assert leftovers(tmp_path) == []


# -- bad input ----------------------------------------------------------------------------------

GOOD = b'{"text": "the old man"}\n'
BAD_CASES = {
    "empty": ("e.jsonl", b"", "e.jsonl: empty input"),
    "blank-only": ("b.jsonl", b"\n  \n\n", "b.jsonl: empty input"),
    "invalid-json": ("j.jsonl", GOOD + GOOD + b'{"text": "x",}\n', "j.jsonl:3: invalid JSON"),
    "missing-field": ("f.jsonl", GOOD + b'{"body": "x", "id": 1}\n', "f.jsonl:2: no field 'text' (fields found: body, id)"),
    "not-a-string": ("s.jsonl", b'{"text": 5}\n', "s.jsonl:1: field 'text' is a number, expected a string"),
    "null": ("n.jsonl", GOOD + b'{"text": null}\n', "n.jsonl:2: field 'text' is null"),
    "not-an-object": ("o.jsonl", b"[1, 2]\n", "o.jsonl:1: expected a JSON object, got list"),
    "utf8-jsonl": ("u.jsonl", GOOD + b'{"text": "caf\xe9"}\n', "u.jsonl:2: invalid UTF-8"),
    "utf8-txt": ("u.txt", b"hello\nwor\xffld\n", "u.txt:2: invalid UTF-8 (byte 0xff at column 4)"),
    "tokenizes-to-nothing": ("z.jsonl", GOOD + b'{"text": ""}\n', "z.jsonl:2: document tokenizes to nothing"),
    "surrogate": ("g.jsonl", b'{"text": "a\\ud800b"}\n', "g.jsonl:1: text is not valid Unicode"),
    "bad-gzip": ("c.jsonl.gz", b"this is not gzip", "c.jsonl.gz: cannot read gz stream"),
    "bad-zstd": ("c.jsonl.zst", b"this is not zstd at all", "c.jsonl.zst: cannot read zst stream"),
    "truncated-gzip": ("t.jsonl.gz", gzip.compress(GOOD * 50)[:-30], "t.jsonl.gz: cannot read gz stream"),
    "unsupported": ("x.csv", b"a,b\n", "x.csv: unsupported input type"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, tok, case):
    name, data, message = BAD_CASES[case]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(EttinError) as ei:
        prepare([tmp_path / name], tok, out, workers=1)
    msg = str(ei.value)
    assert message in msg and "\n" not in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_byte_order_mark_is_ignored(tmp_path, tok):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD + GOOD)
    assert prepare([tmp_path / "bom.jsonl"], tok, tmp_path / "out", workers=1)["documents"] == 2


def test_parquet_missing_column(tmp_path, tok):
    write_parquet(tmp_path / "p.parquet", ["a b"], field="body")
    with pytest.raises(EttinError, match=r"p.parquet: no field 'text' \(fields found: id, body\)"):
        prepare([tmp_path / "p.parquet"], tok, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_worker_errors_propagate(tmp_path, tok):
    texts = texts_for(200)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[150] = '{"text": broken'
    (tmp_path / "w.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EttinError, match=r"w.jsonl:151: invalid JSON"):
        prepare([tmp_path / "w.jsonl"], tok, tmp_path / "out", workers=2, chunk_bytes=500)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_skip_empty(tmp_path, tok):
    (tmp_path / "z.jsonl").write_bytes(GOOD + b'{"text": ""}\n' + GOOD)
    m = prepare([tmp_path / "z.jsonl"], tok, tmp_path / "out", workers=1, skip_empty=True)
    assert m["documents"] == 2 and m["skipped_empty"] == 1 and m["inputs"][0]["skipped_empty"] == 1
    (tmp_path / "all.jsonl").write_bytes(b'{"text": ""}\n')
    with pytest.raises(EttinError, match="no documents left"):
        prepare([tmp_path / "all.jsonl"], tok, tmp_path / "out2", workers=1, skip_empty=True)
    assert not (tmp_path / "out2").exists()


def test_missing_input_and_tokenizer(tmp_path, tok):
    with pytest.raises(EttinError, match="nope.jsonl: input not found"):
        prepare([tmp_path / "nope.jsonl"], tok, tmp_path / "out")
    write_jsonl(tmp_path / "in.jsonl", ["a"])
    with pytest.raises(EttinError, match="tokenizer directory not found"):
        prepare([tmp_path / "in.jsonl"], tmp_path / "notok", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- verify -------------------------------------------------------------------------------------


@pytest.fixture()
def prepared(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", texts_for(40))
    prepare([src], tok, tmp_path / "data", workers=1)
    return tmp_path / "data"


def test_verify_detects_truncation(prepared):
    f = prepared / "tokens-00000.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-2])
    with pytest.raises(EttinError, match="truncated") as ei:
        verify(prepared)
    assert "\n" not in str(ei.value) and "tokens-00000.bin" in str(ei.value)
    with pytest.raises(EttinError, match="truncated"):
        TokenData(prepared)


def test_verify_detects_alteration(prepared):
    f = prepared / "tokens-00000.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(EttinError, match="sha256") as ei:
        verify(prepared)
    assert "tokens-00000.bin" in str(ei.value)
    res = CliRunner().invoke(app, ["data", "verify", str(prepared)])
    assert isinstance(res.exception, EttinError)


def test_verify_detects_altered_offsets_and_manifest(prepared):
    f = prepared / "offsets-00000.bin"
    offs = np.fromfile(f, dtype="<i8")
    offs[3] = offs[5]  # no longer increasing: even opening (without hashing) refuses it
    offs.tofile(f)
    with pytest.raises(EttinError, match="offsets-00000.bin"):
        verify(prepared)
    with pytest.raises(EttinError, match="offsets"):
        TokenData(prepared)


def test_verify_detects_edited_manifest(prepared):
    mpath = prepared / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["documents"] += 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(EttinError, match="manifest"):
        verify(prepared)


def test_cli_prepare_verify_info(tmp_path, tok):
    src = write_jsonl(tmp_path / "in.jsonl", texts_for(30))
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "d"), "--workers", "1", "-q", "--name", "demo"])
    assert res.exit_code == 0, res.output
    assert "30 documents" in res.output
    res = runner.invoke(app, ["data", "verify", str(tmp_path / "d")])
    assert res.exit_code == 0 and res.output.startswith("ok ")
    res = runner.invoke(app, ["data", "info", str(tmp_path / "d"), "--json"])
    assert json.loads(res.output)["name"] == "demo"


def test_cli_error_is_one_line_exit_1(tmp_path, tok):
    (tmp_path / "j.jsonl").write_bytes(GOOD + b"{oops\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "ettin", "data", "prepare", str(tmp_path / "j.jsonl"), "--tokenizer", str(tok), "--out", str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "j.jsonl:2: invalid JSON" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
