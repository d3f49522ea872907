"""CLI: ``ettin tokenizer train|info`` and ``ettin data prepare|verify|info``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from ettin.errors import EttinError


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def register(app: typer.Typer) -> None:
    tok_app = typer.Typer(help="Train and inspect tokenizers (byte-level BPE).", no_args_is_help=True)
    data_app = typer.Typer(help="Prepare, verify and inspect tokenized data directories.", no_args_is_help=True)

    @tok_app.command("train")
    def tokenizer_train(
        inputs: List[Path] = typer.Argument(..., help="Input files or directories (.jsonl[.gz|.zst], .parquet, .txt, MDS, datasets)."),
        vocab_size: int = typer.Option(..., "--vocab-size", help="Target vocabulary (the model's is padded to a multiple of 64)."),
        out: Path = typer.Option(..., "--out", help="Tokenizer directory to write."),
        text_field: str = typer.Option("text", "--text-field", help="JSON/Parquet/datasets field holding the text."),
        text_unit: str = typer.Option("file", "--text-unit", help="For .txt inputs: file, paragraph or line."),
        min_frequency: int = typer.Option(2, "--min-frequency", help="Minimum pair count for a merge."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty --out that is not a tokenizer directory."),
    ):
        """Train a byte-level BPE tokenizer with [CLS] [SEP] [PAD] [MASK] at ids 0-3."""
        from ettin.data.readers import TEXT_UNITS, expand_inputs, iter_texts
        from ettin.data.tokenizer import TOKENIZER_FILE, train_tokenizer
        from ettin.progress import progress
        from ettin.safety import check_out
        from ettin.validate import check_int

        check_int("--vocab-size", vocab_size, 262, 1 << 20)
        check_int("--min-frequency", min_frequency, 0, 2**32 - 1)
        if text_unit not in TEXT_UNITS:
            raise EttinError(f"--text-unit must be one of {', '.join(TEXT_UNITS)}, got '{text_unit}'")
        check_out(out, force=force, ours=(Path(out) / TOKENIZER_FILE).is_file() and not (Path(out) / "manifest.json").exists(),
                  what="tokenizer directory", inputs=tuple(inputs))
        specs = expand_inputs(inputs)
        t0 = time.perf_counter()
        with progress(None, "tokenizer train: reading", "docs", quiet=quiet or None) as bar:

            def texts():
                for t in iter_texts(inputs, text_field=text_field, text_unit=text_unit):
                    bar.advance(1)
                    yield t
                bar.update(desc="tokenizer train: computing merges")  # no progress from inside the BPE trainer

            info = train_tokenizer(texts(), out, vocab_size, min_frequency=min_frequency, show_progress=False,
                                   sources=[str(s.path) for s in specs])
        typer.echo(
            f"wrote {out}: {info['real_vocab_size']:,} tokens, model vocabulary {info['vocab_size']:,} "
            f"(specials cls={info['cls_id']} sep={info['sep_id']} pad={info['pad_id']} mask={info['mask_id']}) "
            f"in {time.perf_counter() - t0:.1f}s"
        )

    @tok_app.command("info")
    def tokenizer_info_cmd(
        directory: Path = typer.Argument(..., help="A tokenizer directory (or a checkpoint/data directory holding tokenizer/)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ):
        """Vocabulary sizes, special token ids and hash of a tokenizer."""
        from ettin.data.tokenizer import load_tokenizer, tokenizer_info

        info = tokenizer_info(directory)
        tok = load_tokenizer(directory)
        model = tok.model.__class__.__name__
        info["model"] = model
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(f"tokenizer        {info['path']} ({model})")
        typer.echo(f"real vocabulary  {info['real_vocab_size']:,}")
        typer.echo(f"model vocabulary {info['vocab_size']:,} (padded to a multiple of 64)")
        for r in ("cls", "sep", "pad", "mask"):
            typer.echo(f"{r + '_id':<16} {info[r + '_id']} {info[r + '_token']}")
        typer.echo(f"shard dtype      {info['dtype']}")
        typer.echo(f"hash             {info['hash']}")

    @data_app.command("prepare")
    def data_prepare(
        inputs: List[Path] = typer.Argument(..., help="Input files or directories (.jsonl[.gz|.zst], .parquet, .txt, MDS, datasets)."),
        tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer directory (any directory with tokenizer.json)."),
        out: Path = typer.Option(..., "--out", help="DATA_DIR to write (complete or absent, never half-written)."),
        text_field: str = typer.Option("text", "--text-field", help="JSON/Parquet/datasets/MDS field holding the text."),
        name: Optional[str] = typer.Option(None, "--name", help="Source name recorded in the manifest (default: DATA_DIR's name)."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: all cores)."),
        text_unit: str = typer.Option("file", "--text-unit", help="For .txt inputs: a document is a file, a paragraph (blank-line separated) or a line."),
        skip_empty: bool = typer.Option(False, "--skip-empty", help="Drop documents that tokenize to nothing instead of failing."),
        shard_tokens: int = typer.Option(1 << 28, "--shard-tokens", help="Tokens per shard file (documents never span shards)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DATA_DIR."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Tokenize inputs into memory-mapped shards with a manifest; each document is [CLS] text [SEP]."""
        from ettin.data.prepare import prepare
        from ettin.validate import check_int

        check_int("--shard-tokens", shard_tokens, 1, 1 << 40)
        if workers is not None:
            check_int("--workers", workers, 1, 1024)

        m = prepare(
            inputs,
            tokenizer,
            out,
            text_field=text_field,
            name=name,
            workers=workers,
            text_unit=text_unit,
            skip_empty=skip_empty,
            shard_tokens=shard_tokens,
            overwrite=overwrite,
            progress=not quiet,
        )
        st = m["stats"]
        skipped = f", {m['skipped_empty']:,} empty skipped" if m["skipped_empty"] else ""
        typer.echo(
            f"wrote {out}: {m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}, {len(m['shards'])} shard(s){skipped}) "
            f"in {st['seconds']:.1f}s, {_human(st['tokens_per_s'])} tokens/s on {st['workers']} worker(s); fingerprint {m['fingerprint'][:16]}"
        )

    @data_app.command("verify")
    def data_verify(data_dir: Path = typer.Argument(..., help="A prepared DATA_DIR.")):
        """Re-hash every shard and compare with the manifest."""
        from ettin.data.shards import verify

        t0 = time.perf_counter()
        m = verify(data_dir)
        n = sum(s["tokens_bytes"] + s["offsets_bytes"] for s in m["shards"])
        typer.echo(f"ok {data_dir}: {len(m['shards'])} shard(s), {m['documents']:,} documents, {m['tokens']:,} tokens, {n / 1e6:.1f} MB checked in {time.perf_counter() - t0:.1f}s")

    @data_app.command("info")
    def data_info(
        data_dir: Path = typer.Argument(..., help="A prepared DATA_DIR."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    ):
        """Summary of a prepared data directory."""
        from ettin.data.shards import read_manifest

        m = read_manifest(data_dir)
        if as_json:
            typer.echo(json.dumps(m, indent=2))
            return
        typer.echo(f"data        {data_dir} (name {m.get('name')})")
        typer.echo(f"documents   {m['documents']:,}")
        typer.echo(f"tokens      {m['tokens']:,} ({m['dtype']}, {len(m['shards'])} shard(s))")
        if m["documents"]:
            typer.echo(f"mean length {m['tokens'] / m['documents']:,.1f} tokens per document")
        t = m["tokenizer"]
        typer.echo(f"tokenizer   vocabulary {t['vocab_size']:,} (real {t['real_vocab_size']:,}), hash {t['hash'][:16]}")
        typer.echo(f"inputs      {len(m.get('inputs', []))}")
        for i in m.get("inputs", []):
            typer.echo(f"  {i['path']}  {i['documents']:,} docs  {i['tokens']:,} tokens  sha256 {str(i['sha256'])[:16]}")
        typer.echo(f"fingerprint {m['fingerprint']}")

    app.add_typer(tok_app, name="tokenizer")
    app.add_typer(data_app, name="data")


__all__ = ["register", "EttinError"]
