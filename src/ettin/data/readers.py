"""Input readers: turn INPUT paths into a stream of document chunks, without holding a file in memory.

Supported inputs (a directory that is neither MDS nor ``datasets`` is searched recursively
for the file types below, in sorted order):

=====================================  ===================================================
``*.jsonl``, ``*.ndjson`` (+ ``.gz``,   one JSON object per line; the document is the
``.zst``)                               ``--text-field`` (default ``text``); blank lines skipped
``*.parquet``                           the ``--text-field`` column, one document per row
``*.txt`` (+ ``.gz``, ``.zst``)         ``--text-unit file`` (default): the whole file is one
                                        document; ``paragraph``: blank-line separated
                                        paragraphs; ``line``: every non-blank line
MDS directory (``index.json``)          through ``mosaicml-streaming`` (``pip install ettin[mds]``)
``datasets`` ``save_to_disk`` dir       through ``datasets`` when installed, else read directly
                                        with pyarrow; a DatasetDict uses its ``train`` split
=====================================  ===================================================

Text is never altered except that plain-text documents lose their final line break(s)
(``\\n`` / ``\\r\\n``) and paragraph/line units drop the line break that separates them.

Readers run in the main process and only split the input into :class:`Chunk` objects (raw
JSONL lines, or texts); decoding, JSON parsing and validation happen in :func:`chunk_texts`,
which the prepare workers run in parallel. Errors name the file and line (or row).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ettin.errors import EttinError

TEXT_UNITS = ("file", "paragraph", "line")
MAX_TXT_DOCUMENT = 256 << 20  # a --text-unit file document larger than this is refused

_JSONL = (".jsonl", ".ndjson")
_TXT = (".txt",)
_COMP = {"": None, ".gz": "gz", ".zst": "zst", ".zstd": "zst"}


@dataclass
class InputSpec:
    path: Path
    kind: str  # jsonl | txt | parquet | mds | hf
    compression: str | None = None
    size: int = 0  # bytes on disk, for progress
    sha256: str | None = None  # filled by the reader once the input was read completely
    documents: int = 0  # filled by the reader (documents found, before any skipping)


@dataclass
class Chunk:
    """A batch of documents from one input. ``mode`` is ``jsonl`` (items: raw line bytes, numbered
    from ``base``) or ``text`` (items: str or bytes). ``locs`` gives explicit numbers per item."""

    input_index: int
    mode: str
    label: str
    base: int
    items: list
    unit: str = "line"  # how a location is written: line -> "f:12", row -> "f: row 12", file -> "f"
    locs: list | None = None
    nbytes: int = 0

    def where(self, i: int) -> str:
        n = self.locs[i] if self.locs is not None else self.base + i
        if self.unit == "line":
            return f"{self.label}:{n}"
        if self.unit == "file":
            return self.label
        return f"{self.label}: {self.unit} {n}"


def _split_suffix(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext, comp in _COMP.items():
        if ext and low.endswith(ext):
            return low[: -len(ext)], comp
    return low, None


def classify(path: Path) -> InputSpec | None:
    """The InputSpec of a path, or None when its type is not one we read."""
    if path.is_dir():
        if (path / "index.json").is_file():
            return InputSpec(path, "mds", size=_dir_size(path))
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return InputSpec(path, "hf", size=_dir_size(path))
        return None
    stem, comp = _split_suffix(path.name)
    if stem.endswith(_JSONL):
        kind = "jsonl"
    elif stem.endswith(_TXT):
        kind = "txt"
    elif stem.endswith(".parquet") and comp is None:
        kind = "parquet"
    else:
        return None
    return InputSpec(path, kind, comp, size=path.stat().st_size)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def expand_inputs(inputs) -> list[InputSpec]:
    """Resolve INPUT arguments to a list of readable inputs (directories searched recursively)."""
    if not inputs:
        raise EttinError("no INPUT given")
    out: list[InputSpec] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise EttinError(f"{p}: input not found")
        spec = classify(p)
        if spec is not None:
            out.append(spec)
            continue
        if p.is_file():
            raise EttinError(f"{p}: unsupported input type (expected .jsonl/.ndjson[.gz|.zst], .parquet, .txt[.gz|.zst], an MDS directory or a datasets directory)")
        found = []
        for root, dirs, files in os.walk(p):
            dirs.sort()
            rootp = Path(root)
            for d in list(dirs):
                s = classify(rootp / d)
                if s is not None:  # MDS / datasets directory: take it whole, do not descend
                    found.append(s)
                    dirs.remove(d)
            for f in sorted(files):
                if f.startswith("."):
                    continue
                s = classify(rootp / f)
                if s is not None:
                    found.append(s)
        if not found:
            raise EttinError(f"{p}: directory contains no supported input files (.jsonl[.gz|.zst], .parquet, .txt, MDS, datasets)")
        found.sort(key=lambda s: str(s.path))
        out.extend(found)
    seen = set()
    for s in out:
        key = s.path.resolve()
        if key in seen:
            raise EttinError(f"{s.path}: given twice as input")
        seen.add(key)
    return out


# -- hashing raw reads ----------------------------------------------------------------------


class _HashingRaw(io.RawIOBase):
    """A raw file that hashes every byte read and reports progress."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None):
        self._f = open(path, "rb", buffering=0)
        self._h = hashlib.sha256()
        self._on = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self._h.update(memoryview(b)[:n])
            if self._on is not None:
                self._on(n)
        return n

    def finish(self) -> str:
        while self.read(1 << 20):
            pass
        return self._h.hexdigest()

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_stream(spec: InputSpec, raw: _HashingRaw):
    buf = io.BufferedReader(raw, buffer_size=1 << 20)
    if spec.compression == "gz":
        return io.BufferedReader(gzip.GzipFile(fileobj=buf, mode="rb"), buffer_size=1 << 20)
    if spec.compression == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(buf, read_across_frames=True), buffer_size=1 << 20)
    return buf


def _stream_errors() -> tuple:
    errs: tuple = (OSError, EOFError, ValueError)
    try:
        import zstandard

        errs += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errs


def _stream_error(spec: InputSpec, e: Exception) -> EttinError:
    return EttinError(f"{spec.path}: cannot read {spec.compression or 'file'} stream ({type(e).__name__}: {e})")


def sha256_tree(path: Path) -> str:
    from ettin.fsutil import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# -- chunking -------------------------------------------------------------------------------


def iter_chunks(
    spec: InputSpec,
    index: int,
    *,
    text_field: str = "text",
    text_unit: str = "file",
    chunk_bytes: int = 1 << 19,
    chunk_docs: int = 4096,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Chunk]:
    """Yield the input's documents in chunks of about ``chunk_bytes``; fills spec.sha256 and
    spec.documents when the input has been read to its end."""
    if text_unit not in TEXT_UNITS:
        raise EttinError(f"--text-unit must be one of {', '.join(TEXT_UNITS)}, got '{text_unit}'")
    fn = {"jsonl": _jsonl_chunks, "txt": _txt_chunks, "parquet": _parquet_chunks, "mds": _mds_chunks, "hf": _hf_chunks}[spec.kind]
    yield from fn(spec, index, text_field=text_field, text_unit=text_unit, chunk_bytes=chunk_bytes, chunk_docs=chunk_docs, on_bytes=on_bytes)


def _jsonl_chunks(spec, index, *, chunk_bytes, chunk_docs, on_bytes, **_):
    label = str(spec.path)
    raw = _HashingRaw(spec.path, on_bytes)
    try:
        stream = _open_stream(spec, raw)
        lines: list[bytes] = []
        size = 0
        base = 1
        lineno = 0
        docs = 0
        try:
            for line in stream:
                lineno += 1
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes or len(lines) >= chunk_docs:
                    docs += sum(1 for x in lines if x.strip())
                    yield Chunk(index, "jsonl", label, base, lines, nbytes=size)
                    base = lineno + 1
                    lines, size = [], 0
        except _stream_errors() as e:
            raise _stream_error(spec, e) from None
        if lines:
            docs += sum(1 for x in lines if x.strip())
            yield Chunk(index, "jsonl", label, base, lines, nbytes=size)
        spec.sha256 = raw.finish()
        spec.documents = docs
    finally:
        raw.close()


def _strip_eol(b: bytes) -> bytes:
    if b.endswith(b"\n"):
        b = b[:-1]
        if b.endswith(b"\r"):
            b = b[:-1]
    return b


def _txt_chunks(spec, index, *, text_unit, chunk_bytes, chunk_docs, on_bytes, **_):
    label = str(spec.path)
    raw = _HashingRaw(spec.path, on_bytes)
    docs = 0
    try:
        stream = _open_stream(spec, raw)
        try:
            if text_unit == "file":
                data = stream.read(MAX_TXT_DOCUMENT + 1)
                if len(data) > MAX_TXT_DOCUMENT:
                    raise EttinError(f"{label}: a {MAX_TXT_DOCUMENT >> 20} MiB+ file cannot be one document; use --text-unit paragraph or line")
                while data.endswith(b"\n"):
                    data = _strip_eol(data)
                if data:
                    docs = 1
                    yield Chunk(index, "text", label, 1, [data], unit="line", locs=[1], nbytes=len(data))
            else:
                items, locs, size = [], [], 0
                para: list[bytes] = []
                para_start = 0
                lineno = 0

                def flush_para():
                    nonlocal para
                    text = b"\n".join(para)
                    para = []
                    return text

                for line in stream:
                    lineno += 1
                    body = _strip_eol(line)
                    if text_unit == "line":
                        if body.strip():
                            items.append(body)
                            locs.append(lineno)
                            size += len(body)
                    else:
                        if body.strip():
                            if not para:
                                para_start = lineno
                            para.append(body)
                        elif para:
                            t = flush_para()
                            items.append(t)
                            locs.append(para_start)
                            size += len(t)
                    if items and (size >= chunk_bytes or len(items) >= chunk_docs):
                        docs += len(items)
                        yield Chunk(index, "text", label, 0, items, unit="line", locs=locs, nbytes=size)
                        items, locs, size = [], [], 0
                if para:
                    items.append(flush_para())
                    locs.append(para_start)
                if items:
                    docs += len(items)
                    yield Chunk(index, "text", label, 0, items, unit="line", locs=locs, nbytes=size)
        except EttinError:
            raise
        except _stream_errors() as e:
            raise _stream_error(spec, e) from None
        spec.sha256 = raw.finish()
        spec.documents = docs
    finally:
        raw.close()


def _missing_field(label: str, field: str, names) -> EttinError:
    return EttinError(f"{label}: no field '{field}' (fields found: {', '.join(map(str, names)) or 'none'}); choose one with --text-field")


def _column_chunks(index, label, unit, batches, field, chunk_bytes, chunk_docs, on_rows=None):
    """Group an iterator of python lists (one column's values) into chunks."""
    items, size, base, n = [], 0, 0, 0
    for values in batches:
        for v in values:
            items.append(v)
            size += len(v) if isinstance(v, (str, bytes)) else 0
            n += 1
            if size >= chunk_bytes or len(items) >= chunk_docs:
                yield Chunk(index, "text", label, base, items, unit=unit, nbytes=size)
                base, items, size = n, [], 0
        if on_rows is not None:
            on_rows(len(values))
    if items:
        yield Chunk(index, "text", label, base, items, unit=unit, nbytes=size)


def _parquet_chunks(spec, index, *, text_field, chunk_bytes, chunk_docs, on_bytes, **_):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ettin.fsutil import sha256_file

    label = str(spec.path)
    try:
        pf = pq.ParquetFile(spec.path)
    except (pa.ArrowException, OSError) as e:
        raise EttinError(f"{label}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise _missing_field(label, text_field, names)
    total = max(pf.metadata.num_rows, 1)
    per_row = spec.size / total

    def on_rows(n):
        if on_bytes is not None:
            on_bytes(int(n * per_row))

    def batches():
        try:
            for b in pf.iter_batches(batch_size=1024, columns=[text_field]):
                yield b.column(0).to_pylist()
        except pa.ArrowException as e:
            raise EttinError(f"{label}: cannot read Parquet data ({e})") from None

    n = 0
    for ch in _column_chunks(index, label, "row", batches(), text_field, chunk_bytes, chunk_docs, on_rows):
        n += len(ch.items)
        yield ch
    spec.sha256 = sha256_file(spec.path)
    spec.documents = n


def _hf_open(path: Path, text_field: str):
    """(column names, iterator over lists of values) for a datasets save_to_disk directory."""
    label = str(path)
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except ValueError as e:
            raise EttinError(f"{path / 'dataset_dict.json'}: invalid JSON ({e})") from None
        if "train" not in splits:
            raise EttinError(f"{label}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); give the split directory, e.g. {path / (splits[0] if splits else 'SPLIT')}")
        path = path / "train"
    try:
        import datasets  # noqa: F401

        have_datasets = True
    except ImportError:
        have_datasets = False
    if have_datasets:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types for a bad directory
            raise EttinError(f"{label}: cannot load datasets directory ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise EttinError(f"{label}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        names = list(ds.column_names)
        if text_field not in names:
            raise _missing_field(label, text_field, names)

        def batches():
            sub = ds.select_columns([text_field]).with_format("arrow")
            for tbl in sub.iter(batch_size=1024):
                yield tbl.column(0).to_pylist()

        return names, batches()
    # Without the datasets package: read the Arrow stream files listed in state.json.
    import pyarrow as pa

    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EttinError(f"{path / 'state.json'}: not a datasets state file ({e})") from None
    if state.get("_indices_data_files"):
        raise EttinError(f"{label}: datasets directory with an indices mapping; install 'datasets' to read it")
    try:
        schema = pa.ipc.open_stream(pa.memory_map(str(files[0]))).schema if files else pa.schema([])
    except (pa.ArrowException, OSError) as e:
        raise EttinError(f"{files[0]}: not an Arrow stream file ({e})") from None
    names = schema.names
    if text_field not in names:
        raise _missing_field(label, text_field, names)

    def batches():
        for f in files:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(f)))
                for b in reader:
                    yield b.column(b.schema.get_field_index(text_field)).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise EttinError(f"{f}: cannot read Arrow data ({e})") from None

    return names, batches()


def _hf_chunks(spec, index, *, text_field, chunk_bytes, chunk_docs, on_bytes, **_):
    _names, batches = _hf_open(spec.path, text_field)
    n = 0
    for ch in _column_chunks(index, str(spec.path), "row", batches, text_field, chunk_bytes, chunk_docs):
        n += len(ch.items)
        yield ch
    if on_bytes is not None:
        on_bytes(spec.size)
    spec.sha256 = sha256_tree(spec.path)
    spec.documents = n


def _mds_chunks(spec, index, *, text_field, chunk_bytes, chunk_docs, on_bytes, **_):
    label = str(spec.path)
    try:
        from streaming import LocalDataset
    except ImportError:
        raise EttinError(f"{label}: an MDS directory needs mosaicml-streaming (pip install 'ettin[mds]')") from None
    try:
        ds = LocalDataset(local=str(spec.path))
    except Exception as e:  # streaming raises assorted types for a bad index
        raise EttinError(f"{label}: cannot open MDS directory ({type(e).__name__}: {e})") from None
    total = len(ds)
    per = spec.size / max(total, 1)

    def batches():
        step = 1024
        for start in range(0, total, step):
            vals = []
            for i in range(start, min(total, start + step)):
                sample = ds[i]
                if text_field not in sample:
                    raise EttinError(f"{label}: sample {i}: no field '{text_field}' (fields found: {', '.join(sample)}); choose one with --text-field")
                vals.append(sample[text_field])
            if on_bytes is not None:
                on_bytes(int(len(vals) * per))
            yield vals

    n = 0
    for ch in _column_chunks(index, label, "sample", batches(), text_field, chunk_bytes, chunk_docs):
        n += len(ch.items)
        yield ch
    spec.sha256 = sha256_tree(spec.path)
    spec.documents = n


# -- decoding and validation (runs in workers) -----------------------------------------------


def _utf8_error(chunk: Chunk, i: int, data: bytes, e: UnicodeDecodeError) -> EttinError:
    if chunk.mode == "text" and chunk.unit == "line":
        n = (chunk.locs[i] if chunk.locs is not None else chunk.base + i) + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        where = f"{chunk.label}:{n}"
    else:
        where = chunk.where(i)
        col = e.start + 1
    return EttinError(f"{where}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); inputs must be UTF-8 text")


def chunk_texts(chunk: Chunk, text_field: str) -> tuple[list[str], list[int]]:
    """Decode and validate a chunk: (texts, item indices they came from). Raises EttinError."""
    texts: list[str] = []
    where: list[int] = []
    if chunk.mode == "jsonl":
        loads = json.loads
        for i, line in enumerate(chunk.items):
            if not line.strip():
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(chunk, i, line, e) from None
            if i == 0 and chunk.base == 1 and s.startswith("\ufeff"):
                s = s[1:]  # a byte-order mark at the start of the file
            try:
                obj = loads(s)
            except ValueError as e:
                msg = getattr(e, "msg", str(e)).removesuffix(" at")
                col = getattr(e, "colno", None)
                raise EttinError(f"{chunk.where(i)}: invalid JSON ({msg}{f' at column {col}' if col else ''})") from None
            except RecursionError:
                raise EttinError(f"{chunk.where(i)}: invalid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise EttinError(f"{chunk.where(i)}: expected a JSON object, got {type(obj).__name__}")
            try:
                text = obj[text_field]
            except KeyError:
                raise _missing_field(chunk.where(i), text_field, list(obj)) from None
            if not isinstance(text, str):
                raise EttinError(f"{chunk.where(i)}: field '{text_field}' is {_json_type(text)}, expected a string")
            texts.append(text)
            where.append(i)
        return texts, where
    for i, v in enumerate(chunk.items):
        if isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v)
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(chunk, i, v, e) from None
        elif not isinstance(v, str):
            raise EttinError(f"{chunk.where(i)}: field '{text_field}' is {_json_type(v)}, expected a string")
        texts.append(v)
        where.append(i)
    return texts, where


def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def iter_texts(inputs, *, text_field: str = "text", text_unit: str = "file") -> Iterator[str]:
    """Every document text of the inputs, in order (used to train tokenizers)."""
    specs = expand_inputs(inputs)
    for idx, spec in enumerate(specs):
        for ch in iter_chunks(spec, idx, text_field=text_field, text_unit=text_unit):
            texts, where = chunk_texts(ch, text_field)
            for t, w in zip(texts, where):
                if not t.isascii():  # a lone surrogate (from a JSON \ud800 escape) cannot reach the tokenizer
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise EttinError(f"{ch.where(w)}: text is not valid Unicode ({e.reason} at character {e.start + 1}, e.g. an unpaired \\u surrogate escape)") from None
                yield t
        if spec.documents == 0:
            raise EttinError(f"{spec.path}: empty input (no documents)")
