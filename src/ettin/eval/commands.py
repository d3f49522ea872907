"""``ettin eval MODEL --tasks ... --data DIR [--split validation] [--json OUT]``.

MODEL: a checkpoint, a run directory (every checkpoint, by step: a trajectory), a pair run
(encoder and decoder), or a Hugging Face directory. JSON output: ``{"model", "results"}`` for
one model, a list of ``{"model", "kind", "step", "tokens", "results"}`` otherwise. A model from a
run directory also gets one line appended to ``RUN/eval.jsonl`` (model, checkpoint, step,
tokens, kind, objective, origin, split, results) for ``ettin report``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

import typer

from ettin.errors import EttinError

EVAL_LOG = "eval.jsonl"


def _clean(obj):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _parse_list(text: str | None, conv, what: str):
    if text is None:
        return None
    try:
        vals = tuple(conv(t.strip()) for t in text.split(",") if t.strip())
    except ValueError:
        raise EttinError(f"{what} must be a comma-separated list of numbers, got '{text}'") from None
    if not vals:
        raise EttinError(f"{what} is empty")
    return vals


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def append_eval_log(em, results: dict, split: str) -> Path:
    """One line in RUN/eval.jsonl (appended and flushed; a reader never sees half a line twice)."""
    path = Path(em.run_dir) / EVAL_LOG
    rec = {
        "model": str(em.run_dir),
        "checkpoint": str(em.path),
        "step": em.step,
        "tokens": em.tokens,
        "kind": em.kind,
        "objective": em.objective,
        "origin": em.origin,
        "split": split,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    line = json.dumps(_clean(rec), sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def print_table(em, results: dict, times: dict, console) -> None:
    from rich.table import Table

    bits = [em.kind, em.objective]
    if em.step is not None:
        bits.append(f"step {em.step:,}")
    if em.tokens is not None:
        bits.append(f"{em.tokens:,} tokens")
    title = f"{em.name} ({', '.join(bits)})"
    t = Table(title=title, title_justify="left", min_width=min(len(title), console.width))  # the title on one line
    t.add_column("task")
    t.add_column("metrics")
    t.add_column("n", justify="right")
    t.add_column("s", justify="right")
    for task, res in results.items():
        note = res.get("note")
        metrics = "  ".join(f"{k} {_fmt(v)}" for k, v in res.items() if k not in ("n", "note"))
        if note:
            metrics = f"{metrics}  ({note})" if metrics else note
        t.add_row(task, metrics, _fmt(res.get("n", "")), f"{times.get(task, 0.0):.1f}")
    console.print(t)


def register(app) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Path = typer.Argument(..., help="Checkpoint, run directory (a trajectory), pair run (both sides), Hugging Face directory or Hub id (ORG/NAME)."),
        tasks: str = typer.Option(..., "--tasks", help="Comma-separated tasks or groups: mc, lm, qa, glue, retrieval, winogender, all."),
        data: Path = typer.Option(None, "--data", help="Data directory in the layout of ../shared/data (default: $ETTIN_DATA)."),
        split: str = typer.Option("validation", "--split", help="Evaluation split (file name prefix)."),
        json_out: Path = typer.Option(None, "--json", help="Write the results as JSON here ('-' for stdout)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Sequences per forward pass."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        limit: int = typer.Option(None, "--limit", help="Examples per task, for quick runs: items, queries or lines; perplexity tasks: the first N documents, each cut to its first --max-length tokens. Also caps fine-tuning data."),
        seeds: str = typer.Option(None, "--seeds", help="Fine-tuning seeds, e.g. 0,1,2."),
        lrs: str = typer.Option(None, "--lrs", help="Fine-tuning learning-rate grid, e.g. 3e-5,1e-4,3e-4."),
        epochs: int = typer.Option(None, "--epochs", help="GLUE fine-tuning epochs."),
        encoder_pooling: str = typer.Option(None, "--encoder-pooling", help="GLUE pooling for encoders: mean or cls."),
        decoder_pooling: str = typer.Option(None, "--decoder-pooling", help="GLUE pooling for decoders: last or mean."),
        pooling: str = typer.Option(None, "--pooling", help="Pooling for retrieval and GLUE on both sides: mean, cls or last (default: mean for encoders, last token for decoders)."),
        encoder_scoring: str = typer.Option(None, "--encoder-scoring", help="Encoders on multiple choice and LAMBADA: ltr (default: the Ettin authors' left-to-right scoring, token k at the first of three [MASK]s) or pll (pseudo-log-likelihood)."),
        winogender: str = typer.Option(None, "--winogender", help="Winogender protocol: gotcha (default: the authors' probe on the gotcha sentences) or all (every sentence, with breakdowns)."),
        max_length: int = typer.Option(None, "--max-length", help="Longest scored sequence (contexts are cut from the left)."),
        no_finetune: bool = typer.Option(False, "--no-finetune", help="Zero-shot retrieval; GLUE is skipped."),
        no_log: bool = typer.Option(False, "--no-log", help="Do not append to RUN/eval.jsonl."),
        samples_out: Path = typer.Option(None, "--samples", help="Write one JSON line per example and task here (model, step, task, id, label, prediction, scores, metrics)."),
        precision: str = typer.Option(None, "--precision", help="fp32 (default) or bf16 autocast for zero-shot scoring (GPUs; CPUs with AVX512-BF16/AMX); fine-tuning stays fp32."),
    ):
        """Evaluate checkpoints on zero-shot and fine-tuned tasks (both sides, same tasks)."""
        from rich.console import Console

        from ettin.eval.api import make_options, models_progress, prepare, record, run_prepared, tag_samples
        from ettin.eval.loading import load_for_eval
        from ettin.eval.tasks import data_dir_or_default
        from ettin.fsutil import atomic_write_text

        opts = make_options(
            batch_size=batch_size, device=device, limit=limit, seeds=_parse_list(seeds, int, "--seeds"),
            lrs=_parse_list(lrs, float, "--lrs"), epochs=epochs, encoder_pooling=encoder_pooling,
            decoder_pooling=decoder_pooling, pooling=pooling, encoder_scoring=encoder_scoring, winogender=winogender, max_length=max_length, finetune=not no_finetune,
            precision=precision,
        )
        console = Console(stderr=json_out is not None and str(json_out) == "-")
        data_dir = data_dir_or_default(data)
        models = load_for_eval(model, opts.device)
        prepared = prepare(tasks, data_dir, split, opts)
        records = []
        sample_lines: list[str] = []
        with models_progress(models) as bar:
            for em in models:
                times: dict[str, float] = {}
                got: list | None = [] if samples_out is not None else None
                results = run_prepared(em, prepared, opts, on_task=lambda t, r, s: times.__setitem__(t, s), samples=got)
                if got is not None:
                    sample_lines.extend(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in tag_samples(em, got))
                print_table(em, results, times, console)
                if em.run_dir is not None and not no_log:
                    append_eval_log(em, results, split)
                records.append(record(em, results))
                em.release()
                bar.advance(1)
        single = len(models) == 1 and models[0].run_dir is None
        doc = {"model": records[0]["model"], "results": records[0]["results"]} if single else records
        if json_out is not None:
            text = json.dumps(_clean(doc), indent=2) + "\n"
            if str(json_out) == "-":
                typer.echo(text, nl=False)
            else:
                atomic_write_text(json_out, text)
                console.print(f"wrote {json_out}")
        if samples_out is not None:
            atomic_write_text(samples_out, "".join(sample_lines))
            console.print(f"wrote {samples_out} ({len(sample_lines):,} examples)")

    @app.command("embed")
    def embed_cmd(
        model: Path = typer.Argument(..., help="Checkpoint, run directory (its last checkpoint), Hugging Face directory or Hub id (ORG/NAME)."),
        input_path: Path = typer.Option(..., "--input", help="Texts: .jsonl (one object per line, see --field) or one text per line."),
        out: Path = typer.Option(..., "--out", help="Output .npy file: float32 [texts, hidden], in input order."),
        field: str = typer.Option("text", "--field", help="The text key of .jsonl input."),
        pooling: str = typer.Option(None, "--pooling", help="mean, cls or last (default: mean for encoders, last for decoders)."),
        max_length: int = typer.Option(512, "--max-length", help="Tokens per text, [CLS] and [SEP] included (longer texts are cut)."),
        normalize: bool = typer.Option(False, "--normalize", help="L2-normalise each embedding."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (bf16 autocast)."),
        strategy: str = typer.Option("auto", "--strategy", help="auto, packed (rows of several texts, documents masked) or padded."),
        batch_tokens: int = typer.Option(32768, "--batch-tokens", min=1, help="Tokens per forward pass (pads included)."),
        precision: str = typer.Option(None, "--precision", help="fp32 or bf16 (autocast; GPUs and CPUs with AVX512-BF16/AMX). Default: bf16 on cuda, fp32 on cpu."),
    ):
        """Pooled embeddings of many texts, unpadded (packed) where that saves work."""
        from rich.console import Console

        from ettin.eval.embed import run

        console = Console(stderr=True)
        res = run(model, input_path, out, field=field, pooling=pooling, max_length=max_length, normalize=normalize,
                  device=device, strategy=strategy, token_budget=batch_tokens, console=console, precision=precision)
        console.print(f"wrote {res['out']}: {res['shape'][0]} x {res['shape'][1]} ({res['tokens']:,} tokens, "
                      f"{res['tokens_per_s']:,.0f} tokens/s)")
