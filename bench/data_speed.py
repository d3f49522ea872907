"""Data pipeline speed: prepare throughput vs raw encoding, and loader throughput.

    python bench/data_speed.py [--data ../shared/data/pretrain] [--workers 2] [--repeat 2] [--json OUT]

1. Trains a byte-level BPE tokenizer (--vocab-size, default 8192) on part of the data.
2. Raw: ``Tokenizer.encode_batch`` on every text, already in memory (all cores via the
   tokenizers thread pool; reading and JSON parsing not counted).
3. Prepare: ``ettin.data.prepare.prepare`` on the same files with --workers processes: reading,
   decompression, parsing, tokenizing, writing shards and hashing all counted (wall clock).
   Target: prepare >= 80% of raw.
4. Loader: ``Mixture.rows`` and ``PrefetchLoader`` over the prepared data from a warm memmap
   (seq_len 1024, 32 rows per batch). Target >= 50M tokens/s.

Raw and prepare alternate --repeat times in the same process; the best of each is reported
(the machine may be shared, so the best is the least disturbed measurement).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Explicit setting: the raw measurement uses the tokenizers thread pool in this process; the
# prepare workers switch it off for themselves (one thread per process).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = (HERE.parent.parent / "shared" / "data" / "pretrain") if (HERE.parent.parent / "shared").exists() else Path("/work/shared/data/pretrain")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped child processes."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def read_texts(files):
    texts = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") if f.endswith(".gz") else open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    texts.append(json.loads(line)["text"])
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--loader-tokens", type=float, default=5e8, help="tokens to read in the loader test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from ettin.data.loader import PrefetchLoader
    from ettin.data.mixture import Mixture
    from ettin.data.prepare import prepare
    from ettin.data.readers import iter_texts
    from ettin.data.tokenizer import special_ids, train_tokenizer

    files = sorted(glob.glob(str(args.data / "*.jsonl*")))
    if not files:
        print(f"no .jsonl[.gz] files in {args.data}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="ettin-bench-"))
    print(f"data: {len(files)} files in {args.data}, {sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB on disk; cores: {os.cpu_count()}")

    t = time.perf_counter()
    train_tokenizer(iter_texts(files[:3]), tmp / "tok", args.vocab_size)
    print(f"tokenizer: byte-level BPE, vocab {args.vocab_size}, trained on {len(files[:3])} files in {time.perf_counter() - t:.1f}s")
    tok = Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
    sp = special_ids(tmp / "tok")
    texts = read_texts(files)
    chars = sum(len(x) for x in texts)
    print(f"texts: {len(texts):,} documents, {chars / 1e6:.1f}M characters")

    from machine import machine  # bench/ is on sys.path

    raw_rates, prep_rates, raw_cpu, prep_cpu, results = [], [], [], [], machine(kernels=False)
    for rep in range(args.repeat):
        t, c = time.perf_counter(), cpu_seconds()
        encs = tok.encode_batch(texts, add_special_tokens=False)
        dt, dc = time.perf_counter() - t, cpu_seconds() - c
        n_raw = sum(len(e.ids) for e in encs) + 2 * len(texts)  # + [CLS] and [SEP] per document
        del encs
        raw_rates.append(n_raw / dt)
        raw_cpu.append(n_raw / dc)
        out = tmp / f"prepared-{rep}"
        c = cpu_seconds()
        m = prepare(files, tmp / "tok", out, workers=args.workers)
        pc = cpu_seconds() - c
        prep_cpu.append(m["tokens"] / pc)
        assert m["tokens"] == n_raw, (m["tokens"], n_raw)
        prep_rates.append(m["stats"]["tokens_per_s"])
        print(f"  run {rep + 1}: raw encode_batch {n_raw / dt / 1e6:.3f}M tok/s ({dt:.2f}s) | prepare ({args.workers} workers) {m['stats']['tokens_per_s'] / 1e6:.3f}M tok/s ({m['stats']['seconds']:.2f}s)"
              f" | per CPU-second: raw {n_raw / dc / 1e6:.3f}M, prepare {m['tokens'] / pc / 1e6:.3f}M | load average {os.getloadavg()[0]:.1f}")
    raw, prep = max(raw_rates), max(prep_rates)
    rc, pcpu = max(raw_cpu), max(prep_cpu)
    results.update(tokens=n_raw, raw_tokens_per_s=raw, prepare_tokens_per_s=prep, prepare_vs_raw=prep / raw, workers=args.workers,
                   raw_tokens_per_cpu_s=rc, prepare_tokens_per_cpu_s=pcpu, prepare_vs_raw_cpu=pcpu / rc)
    print(f"prepare: {prep / 1e6:.3f}M tok/s vs raw encode_batch {raw / 1e6:.3f}M tok/s (wall clock, best of {args.repeat}) on the same {n_raw:,} tokens: {100 * prep / raw:.0f}% of raw (target >= 80%)")
    print(f"         per CPU-second (less sensitive to other load on a shared machine): prepare {pcpu / 1e6:.3f}M vs raw {rc / 1e6:.3f}M: {100 * pcpu / rc:.0f}%")

    # -- loader -----------------------------------------------------------------------------
    data_dir = tmp / "prepared-0"
    mix = Mixture([{"path": data_dir}], args.seq_len, 21)
    B, L = args.batch_rows, args.seq_len
    n_batches = max(1, int(args.loader_tokens // (B * L)))
    mix.rows(0, mix.rows_per_epoch)  # warm the page cache and the epoch cache
    t = time.perf_counter()
    for i in range(n_batches):
        mix.rows(i * B, B)
    dt = time.perf_counter() - t
    rows_rate = n_batches * B * L / dt
    ranges = [(i * B, B) for i in range(n_batches)]
    t = time.perf_counter()
    n = 0
    for ids, _dids in PrefetchLoader(mix, ranges, pin_memory=True):
        n += ids.numel()
    dt = time.perf_counter() - t
    loader_rate = n / dt
    epochs = n_batches * B / mix.rows_per_epoch
    results.update(rows_tokens_per_s=rows_rate, loader_tokens_per_s=loader_rate, loader_epochs=epochs, seq_len=L, batch_rows=B)
    print(f"loader: Mixture.rows {rows_rate / 1e6:.0f}M tok/s, PrefetchLoader {loader_rate / 1e6:.0f}M tok/s (seq_len {L}, {B} rows/batch, {n_batches} batches, {epochs:.1f} epochs incl. epoch builds; target >= 50M)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
