"""``ettin demo``: the whole system end to end on a CPU, with nothing but what the package ships.

Tokenizer -> prepared shards -> a tiny encoder/decoder pair through the three stages ->
cross-objective conversions -> evaluation -> Hugging Face exports -> report. Each step is the
same code the real commands run; only the sizes are small.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import typer

from ettin.errors import EttinError


def _say(msg: str) -> None:
    from rich.console import Console

    from ettin.progress import is_quiet

    if not is_quiet():
        Console(stderr=False).print(f"[bold cyan]ettin demo[/] {msg}", soft_wrap=True)


def _read_corpus(path: Path) -> list[str]:
    """The non-empty ``text`` fields of a JSONL (or .jsonl.gz) corpus."""
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                t = json.loads(line).get("text")
                if isinstance(t, str) and t.strip():
                    texts.append(t)
    return texts


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")


def _passages(texts: list[str], n: int) -> list[str]:
    """Paragraph-sized held-out passages: short enough for encoder pseudo-perplexity on a CPU."""
    out = []
    for t in texts:
        for para in t.split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 600:
                out.append(para)
    step = max(1, len(out) // n)
    return out[::step][:n]


def _resolve_recipes(out: Path, data_dir: Path, scale: float) -> Path:
    """Copy the small recipes into OUT/recipes with the demo's data path filled in."""
    from importlib.resources import files

    import yaml

    src = Path(str(files("ettin") / "recipes" / "small"))
    dst = out / "recipes"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("stage1.yaml", "stage2.yaml", "stage3.yaml", "cross-objective.yaml"):
        raw = yaml.safe_load((src / name).read_text())
        raw["data"]["sources"] = [{"name": "demo", "path": str(data_dir), "weight": 1.0}]
        raw["train"]["tokens"] = int(float(raw["train"]["tokens"]) * scale)
        raw["checkpoint"]["every_tokens"] = int(float(raw["checkpoint"]["every_tokens"]) * scale)
        if "batch_warmup_tokens" in raw["train"]:
            raw["train"]["batch_warmup_tokens"] = int(float(raw["train"]["batch_warmup_tokens"]) * scale)
        sched = raw["optim"]["schedule"]
        for k in ("warmup_tokens", "decay_tokens"):
            if k in sched:
                sched[k] = int(float(sched[k]) * scale)
        raw["logging"] = {"tensorboard": False}
        (dst / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    (dst / "all.yaml").write_text("stages: [stage1.yaml, stage2.yaml, stage3.yaml]\n")
    return dst


def run_demo(out: Path, *, scale: float = 1.0, vocab_size: int = 2048, evaluate: bool = True, progress: bool = True, eval_limit: int | None = None) -> dict:
    """Run every step; ``progress=False`` silences bars and narration (as ``--quiet`` does)."""
    from ettin import progress as P

    saved = P._quiet
    if not progress:
        P.set_quiet(True)
    try:
        return _run_demo(out, scale=scale, vocab_size=vocab_size, evaluate=evaluate, progress=progress, eval_limit=eval_limit)
    finally:
        P.set_quiet(saved)


def _run_demo(out: Path, *, scale: float, vocab_size: int, evaluate: bool, progress: bool, eval_limit: int | None) -> dict:
    from ettin.data import demo_corpus_path, demo_heldout_path
    from ettin.data.prepare import prepare
    from ettin.data.tokenizer import train_tokenizer

    t_start = time.time()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out)}

    # 1. corpus: the shipped sample (training) and its held-out documents (evaluation)
    train_texts = _read_corpus(demo_corpus_path())
    heldout = _read_corpus(demo_heldout_path())
    corpus = out / "corpus" / "train.jsonl"
    _write_jsonl(corpus, train_texts)
    evaldata = out / "evaldata"
    _write_jsonl(evaldata / "lm" / "demo_heldout" / "validation.jsonl", _passages(heldout, 32))
    _say(f"corpus: {len(train_texts)} training documents, {len(heldout)} held out ({demo_corpus_path().name})")

    # 2. tokenizer and prepared shards
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from ettin.progress import progress as bar

        with bar(len(train_texts), "tokenizer: reading", "docs") as b:

            def texts():
                for t in train_texts:
                    b.advance(1)
                    yield t
                b.update(desc="tokenizer: computing merges")

            train_tokenizer(texts(), tok_dir, vocab_size, sources=[str(corpus)])
        _say(f"trained a {vocab_size}-token BPE tokenizer -> {tok_dir}")
    data_dir = out / "data"
    if not (data_dir / "manifest.json").is_file():
        man = prepare([corpus], tok_dir, data_dir, name="demo", workers=2, progress=progress)
        _say(f"prepared {man['tokens']:,} tokens in {man['documents']:,} documents -> {data_dir}")

    # 3. the pair through stages 1-3
    from ettin.train.trainer import train

    recipes = _resolve_recipes(out, data_dir, scale)
    _say("training the encoder/decoder pair through stages 1-3 (recipes in %s)" % recipes)
    res = train(recipes / "all.yaml", out / "pair", pair=True, progress=progress)
    summary["pair"] = {k: {"first_loss": res["first_loss"].get(k), "last_loss": v["loss"]} for k, v in res.get("last", {}).items()}

    # 4. cross-objective conversions from the final checkpoints
    from ettin.convert.objective import convert

    conv = out / "convert"
    _say("cross-objective training: encoder-from-decoder (MNTP) and decoder-from-encoder (CLM)")
    convert(out / "pair" / "decoder", "mntp", recipes / "cross-objective.yaml", conv / "encoder-from-decoder", progress=progress)
    convert(out / "pair" / "encoder", "clm", recipes / "cross-objective.yaml", conv / "decoder-from-encoder", progress=progress)

    # 5. Hugging Face exports of the final checkpoints
    from ettin.convert.hf import export_checkpoint
    from ettin.train.trainer import last_checkpoint

    exports = {
        "encoder": out / "pair" / "encoder",
        "decoder": out / "pair" / "decoder",
        "encoder-from-decoder": conv / "encoder-from-decoder",
        "decoder-from-encoder": conv / "decoder-from-encoder",
    }
    for name, run in exports.items():
        export_checkpoint(last_checkpoint(run), out / "hf" / name)
    _say(f"exported to {out / 'hf'}")

    # 6. evaluation of every checkpoint (a trajectory) on the held-out text
    if evaluate:
        from ettin.eval.api import evaluate_all
        from ettin.eval.commands import append_eval_log

        runs = [out / "pair" / "encoder", out / "pair" / "decoder", conv / "encoder-from-decoder", conv / "decoder-from-encoder"]
        for run in runs:
            evaluate_all(run, ["lm/demo_heldout"], evaldata, on_model=lambda em, res: append_eval_log(em, res, "validation"), limit=eval_limit)
        _say("evaluated every checkpoint on the held-out text")

    # 7. the report
    from ettin.report import write_report

    _say("writing the report")

    report = write_report([out / "pair", conv], out / "report.html")
    summary["report"] = str(report)
    summary["seconds"] = round(time.time() - t_start, 1)
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("ettin-demo"), "--out", help="Directory for everything the demo makes."),
        scale: float = typer.Option(1.0, "--scale", help="Multiply the demo's token budgets (0.2 for a quick look)."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Skip evaluation."),
    ):
        """Tiny pair end to end on CPU: tokenizer, data, 3 stages, conversions, eval, export, report."""
        if scale <= 0:
            raise EttinError(f"--scale must be positive, got {scale}")
        s = run_demo(out, scale=scale, evaluate=not no_eval)
        for k, v in s.get("pair", {}).items():
            typer.echo(f"{k}: loss {v['first_loss']:.3f} -> {v['last_loss']:.3f}")
        typer.echo(f"report: {s['report']}  ({s['seconds']} s)")
