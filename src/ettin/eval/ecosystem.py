"""Our exported models in the common tools: sentence-transformers, MTEB and lm-evaluation-harness.

``ettin export`` writes a Hugging Face directory; for an encoder it also writes the
sentence-transformers files (``modules.json``, ``1_Pooling/config.json``: mean pooling). This
module runs those directories through the ecosystem on the local data of ``../shared/data``,
offline:

* :func:`load_sentence_transformer` / :func:`encode_sentences`: an exported encoder as a
  ``SentenceTransformer``.
* :func:`beir_retrieval_task` / :func:`run_mteb_retrieval`: any BEIR-layout directory
  (``corpus.jsonl[.gz]``, ``queries.jsonl``, ``qrels/<split>.tsv``) as an MTEB custom retrieval task.
* :func:`render_lm_eval_tasks` / :func:`lm_eval_args` / :func:`run_lm_eval`: the lm-eval task YAMLs
  shipped in ``ettin/eval/lm_eval_tasks`` (multiple choice, LAMBADA, WikiText-2, TriviaQA) with
  the data paths filled in, run with ``lm_eval --model hf``::

      python -m ettin.eval.ecosystem tasks --data ../shared/data --out /tmp/ettin_tasks
      lm_eval --model hf --model_args pretrained=HF_DIR,add_bos_token=True,dtype=float32 \\
              --include_path /tmp/ettin_tasks --tasks ettin_mc

Results come back in the shape ``ettin eval`` uses: ``{TASK: {METRIC: value, "n": count}}``.

Tokenization note for decoders: our tokenizers wrap a document as ``[CLS] text [SEP]``. lm-eval
splits "context + continuation" after tokenizing both, so a trailing ``[SEP]`` would shift every
continuation by one token. ``add_bos_token=True`` (the default here) makes transformers rebuild
the post-processor as ``[CLS] $A``: contexts start with ``[CLS]`` as in training, nothing is
appended. (For rolling log-likelihood, lm-eval then also scores ``[CLS]`` after its own prefix
token: one extra token per WikiText article, as for every model lm-eval runs with a BOS.)

The libraries are optional (``pip install 'ettin[ecosystem]'``); a missing one is a one-line
:class:`EttinError` naming the package.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ettin.errors import EttinError

TEMPLATE_DIR = Path(__file__).with_name("lm_eval_tasks")
UTILS_FILE = "ettin_utils.py"
# our task name -> (lm-eval task name, data subdirectory)
LM_EVAL_TASKS = {
    "arc_easy": ("ettin_arc_easy", "mc/arc_easy"),
    "arc_challenge": ("ettin_arc_challenge", "mc/arc_challenge"),
    "hellaswag": ("ettin_hellaswag", "mc/hellaswag"),
    "piqa": ("ettin_piqa", "mc/piqa"),
    "siqa": ("ettin_siqa", "mc/siqa"),
    "boolq": ("ettin_boolq", "mc/boolq"),
    "winogrande": ("ettin_winogrande", "mc/winogrande"),
    "openbookqa": ("ettin_openbookqa", "mc/openbookqa"),
    "lambada_openai": ("ettin_lambada_openai", "lm_eval/lambada_openai"),
    "wikitext2": ("ettin_wikitext2", "lm_eval/wikitext2"),
    "triviaqa": ("ettin_triviaqa", "qa/triviaqa"),
}
LM_EVAL_GROUPS = {
    "mc": [t for t, (_, d) in LM_EVAL_TASKS.items() if d.startswith("mc/")],
    "lm": ["lambada_openai", "wikitext2"],
    "qa": ["triviaqa"],
}
LM_EVAL_GROUPS["all"] = list(LM_EVAL_TASKS)
_PIP = {"sentence_transformers": "sentence-transformers", "mteb": "mteb", "lm_eval": "lm-eval", "datasets": "datasets"}


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == module.split(".")[0]:
            pkg = _PIP.get(module.split(".")[0], module)
            raise EttinError(f"this needs the '{pkg}' package: pip install '{pkg}' (or pip install 'ettin[ecosystem]')") from None
        raise


def _hf_dir(path: str | Path, *, want: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = " (an ettin checkpoint? run 'ettin export CKPT --out HF_DIR' first)" if (path / "ettin.json").is_file() else ""
        raise EttinError(f"{path}: not a Hugging Face model directory (no config.json){hint}")
    if want == "sentence-transformers" and not (path / "modules.json").is_file():
        raise EttinError(f"{path}: no modules.json; export an encoder with 'ettin export' to get the sentence-transformers files")
    return path


# ----------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ----------------------------------------------------------------------------------------------
def lm_eval_tasks_dir() -> Path:
    """The shipped task templates (``@DATA@``/``@SPLIT@`` placeholders; render before use)."""
    return TEMPLATE_DIR


def resolve_lm_eval_tasks(tasks: str | list[str] | None) -> list[str]:
    """Our task names from names, groups (mc, lm, qa, all) or lm-eval names (ettin_*)."""
    if tasks is None:
        return list(LM_EVAL_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        t = t.strip()
        name = t.removeprefix("ettin_")
        names = LM_EVAL_GROUPS.get(name, [name])
        for n in names:
            if n not in LM_EVAL_TASKS:
                raise EttinError(f"unknown lm-eval task '{t}': known are {', '.join(LM_EVAL_TASKS)} and groups {', '.join(LM_EVAL_GROUPS)}")
            if n not in out:
                out.append(n)
    return out


def _data_files(data_dir: Path, sub: str, split: str) -> list[Path]:
    return sorted((data_dir / sub).glob(f"{split}*.jsonl"))


def render_lm_eval_tasks(data_dir: str | Path, out_dir: str | Path, *, split: str = "validation",
                         tasks: str | list[str] | None = None) -> Path:
    """Write the shipped task YAMLs with ``data_dir``/``split`` filled in; returns ``out_dir``.

    Every task's files must exist (``DATA/<family>/<task>/<split>*.jsonl``); otherwise a one-line
    error says which path was expected.
    """
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise EttinError(f"{data_dir}: no such data directory")
    if not re.fullmatch(r"\w+", split):
        raise EttinError(f"split '{split}' must be a plain name such as 'validation'")
    names = resolve_lm_eval_tasks(tasks)
    for n in names:
        sub = LM_EVAL_TASKS[n][1]
        if not _data_files(data_dir, sub, split):
            raise EttinError(f"{data_dir / sub}/{split}*.jsonl: no such file (needed by lm-eval task '{n}')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_str = json.dumps(data_dir.as_posix())[1:-1]  # safe inside a YAML double-quoted string
    for n in names:
        lm_name = LM_EVAL_TASKS[n][0]
        text = (TEMPLATE_DIR / f"{lm_name}.yaml").read_text()
        text = text.replace("@DATA@", data_str).replace("@SPLIT@", split)
        (out_dir / f"{lm_name}.yaml").write_text(text)
    shutil.copy2(TEMPLATE_DIR / UTILS_FILE, out_dir / UTILS_FILE)
    return out_dir


def lm_eval_model_args(hf_dir: str | Path, *, dtype: str = "float32", add_bos_token: bool = True,
                       max_length: int | None = None, **extra) -> str:
    """``--model_args`` for ``lm_eval --model hf`` on an exported decoder."""
    hf_dir = _hf_dir(hf_dir, want="lm-eval")
    args = {"pretrained": hf_dir.resolve().as_posix(), "dtype": dtype, "add_bos_token": add_bos_token}
    if max_length is not None:
        args["max_length"] = int(max_length)
    args.update(extra)
    for k, v in args.items():
        if "," in str(v) or "=" in str(v):
            raise EttinError(f"lm-eval model argument {k}={v!r} may not contain ',' or '='")
    return ",".join(f"{k}={v}" for k, v in args.items())


def lm_eval_args(hf_dir: str | Path, data_dir: str | Path, *, tasks: str | list[str] | None = None,
                 split: str = "validation", task_dir: str | Path | None = None, batch_size: int = 8,
                 device: str = "cpu", limit: int | float | None = None, **model_kwargs) -> dict:
    """Keyword arguments for ``lm_eval.simple_evaluate`` (tasks rendered into ``task_dir``, or a temp dir)."""
    lm_eval_tasks_mod = _require("lm_eval.tasks")
    names = resolve_lm_eval_tasks(tasks)
    task_dir = Path(task_dir) if task_dir is not None else Path(tempfile.mkdtemp(prefix="ettin-lm-eval-tasks-"))
    render_lm_eval_tasks(data_dir, task_dir, split=split, tasks=names)
    tm = lm_eval_tasks_mod.TaskManager(include_path=str(task_dir), include_defaults=False)
    return {
        "model": "hf",
        "model_args": lm_eval_model_args(hf_dir, **model_kwargs),
        "tasks": [LM_EVAL_TASKS[n][0] for n in names],
        "task_manager": tm,
        "batch_size": batch_size,
        "device": device,
        "limit": limit,
    }


def lm_eval_command(hf_dir: str | Path, task_dir: str | Path, tasks: str | list[str] | None = None, **model_kwargs) -> str:
    """The equivalent ``lm_eval`` command line (for a rendered ``task_dir``)."""
    names = [LM_EVAL_TASKS[n][0] for n in resolve_lm_eval_tasks(tasks)]
    return (f"lm_eval --model hf --model_args {lm_eval_model_args(hf_dir, **model_kwargs)} "
            f"--include_path {Path(task_dir).resolve().as_posix()} --tasks {','.join(names)} --device cpu")


def convert_lm_eval_results(out: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` (``"acc,none"``...) -> ``{our task: {metric: value, "n": count}}``."""
    back = {lm: ours for ours, (lm, _) in LM_EVAL_TASKS.items()}
    res: dict[str, dict[str, float]] = {}
    n_samples = out.get("n-samples") or {}
    for lm_name, metrics in (out.get("results") or {}).items():
        task = back.get(lm_name, lm_name)
        d: dict[str, float] = {}
        for key, v in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            metric, _, _filter = key.partition(",")
            if not math.isfinite(float(v)):
                continue
            d[metric] = float(v)
        n = (n_samples.get(lm_name) or {}).get("effective")
        if n is not None:
            d["n"] = int(n)
        res[task] = d
    return res


def run_lm_eval(hf_dir: str | Path, data_dir: str | Path, *, tasks: str | list[str] | None = None,
                split: str = "validation", limit: int | float | None = None, batch_size: int = 8,
                device: str = "cpu", log_samples: bool = False, task_dir: str | Path | None = None,
                **model_kwargs) -> dict:
    """Run lm-evaluation-harness (``--model hf``) on an exported decoder with the shipped tasks.

    Returns ``{"results": {TASK: {METRIC: value, "n": count}}, "lm_eval": <lm-eval's output>}``.
    """
    lm_eval = _require("lm_eval")
    tmp = None
    if task_dir is None:
        tmp = tempfile.mkdtemp(prefix="ettin-lm-eval-tasks-")
        task_dir = tmp
    try:
        kwargs = lm_eval_args(hf_dir, data_dir, tasks=tasks, split=split, task_dir=task_dir, batch_size=batch_size,
                              device=device, limit=limit, **model_kwargs)
        out = lm_eval.simple_evaluate(**kwargs, log_samples=log_samples, bootstrap_iters=0)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if out is None:  # only on non-zero ranks of a distributed run
        return {"results": {}, "lm_eval": None}
    return {"results": convert_lm_eval_results(out), "lm_eval": out}


# ----------------------------------------------------------------------------------------------
# sentence-transformers and MTEB
# ----------------------------------------------------------------------------------------------
def load_sentence_transformer(hf_dir: str | Path, *, device: str = "cpu"):
    """An exported encoder as a ``SentenceTransformer`` (mean pooling from ``1_Pooling``)."""
    st = _require("sentence_transformers")
    hf_dir = _hf_dir(hf_dir, want="sentence-transformers")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MLM head is unused by a sentence embedder: not worth a warning table
    try:
        return st.SentenceTransformer(str(hf_dir), device=device, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


def encode_sentences(model_or_dir, sentences: list[str], *, batch_size: int = 32):
    """Sentence embeddings (numpy ``[N, H]``), unnormalised, as sentence-transformers computes them."""
    model = load_sentence_transformer(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    return model.encode(list(sentences), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def _read_jsonl_any(path: Path) -> list[dict]:
    """BEIR lines (plain or gzipped JSONL), each an object with an '_id'."""
    from ettin.eval.data import read_jsonl

    rows = []
    for i, obj in read_jsonl(path):
        if "_id" not in obj:
            raise EttinError(f"{path}:{i}: expected an object with '_id' (BEIR layout)")
        rows.append(obj)
    return rows


def read_beir(task_dir: str | Path, split: str) -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus {id: {title, text}}, queries {id: text} (those in the split's qrels), qrels {qid: {did: score}})."""
    task_dir = Path(task_dir)
    corpus_path = next((p for p in (task_dir / "corpus.jsonl", task_dir / "corpus.jsonl.gz") if p.is_file()), None)
    if corpus_path is None:
        raise EttinError(f"{task_dir / 'corpus.jsonl'}: no such file (nor corpus.jsonl.gz)")
    qpath, rpath = task_dir / "queries.jsonl", task_dir / "qrels" / f"{split}.tsv"
    for p in (qpath, rpath):
        if not p.is_file():
            raise EttinError(f"{p}: no such file")
    corpus = {str(d["_id"]): {"title": str(d.get("title") or ""), "text": str(d.get("text") or "")} for d in _read_jsonl_any(corpus_path)}
    all_q = {str(q["_id"]): str(q.get("text") or "") for q in _read_jsonl_any(qpath)}
    qrels: dict[str, dict[str, int]] = {}
    with open(rpath, newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if i == 1 and row and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if not row or not "".join(row).strip():
                continue
            if len(row) < 3:
                raise EttinError(f"{rpath}:{i}: expected 'query-id<TAB>corpus-id<TAB>score'")
            q, d, s = row[0].strip(), row[1].strip(), row[2].strip()
            try:
                score = int(float(s))
            except ValueError:
                raise EttinError(f"{rpath}:{i}: score {s!r} is not a number") from None
            if q not in all_q:
                raise EttinError(f"{rpath}:{i}: query '{q}' is not in {qpath.name}")
            if d not in corpus:
                raise EttinError(f"{rpath}:{i}: document '{d}' is not in {corpus_path.name}")
            qrels.setdefault(q, {})[d] = score
    if not qrels:
        raise EttinError(f"{rpath}: no relevance judgements")
    queries = {q: all_q[q] for q in qrels}
    return corpus, queries, qrels


def beir_retrieval_task(task_dir: str | Path, split: str, *, name: str | None = None):
    """An MTEB custom retrieval task (``AbsTaskRetrieval``) over a local BEIR-layout directory."""
    _require("mteb")
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    task_dir = Path(task_dir)
    corpus, queries, qrels = read_beir(task_dir, split)
    name = name or "Ettin" + "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", task_dir.name) if w)

    class LocalBeirRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name, type="Retrieval", main_score="ndcg_at_10",
            description=f"Local BEIR-layout retrieval data from {task_dir} (split {split}), run by ettin.",
            reference=None, dataset={"path": str(task_dir), "revision": "local"}, category="t2t",
            eval_splits=[split], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None, task_subtypes=None,
            license=None, annotations_creators=None, modalities=["text"], sample_creation=None, bibtex_citation=None,
        )

        def load_data(self, num_proc=None, **kwargs):  # mteb's signature
            self.dataset = {"default": {split: RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in queries.items()]),
                corpus=Dataset.from_list([{"id": d, "text": v["text"], "title": v["title"]} for d, v in corpus.items()]),
                relevant_docs={q: dict(r) for q, r in qrels.items()},
                top_ranked=None,
            )}}
            self.data_loaded = True

    task = LocalBeirRetrieval()
    task.ettin_num_queries = len(queries)  # mteb drops its dataset after evaluating
    return task


def run_mteb_retrieval(model_or_dir, task_dir: str | Path, split: str, *, name: str | None = None,
                       batch_size: int = 32) -> dict[str, float]:
    """Evaluate an exported encoder (directory or ``SentenceTransformer``) with MTEB on local BEIR data.

    Returns ``{"ndcg@10", "recall@100", "map@10", "mrr@10", "n", "mteb": {...all scores}}``.
    """
    mteb = _require("mteb")
    model = load_sentence_transformer(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    task = beir_retrieval_task(task_dir, split, name=name)
    result = mteb.evaluate(model, task, cache=None, overwrite_strategy="always", show_progress_bar=False,
                           encode_kwargs={"batch_size": batch_size})
    scores = result.task_results[0].scores[split][0]
    clean = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    out = {"ndcg@10": clean["ndcg_at_10"], "recall@100": clean["recall_at_100"], "map@10": clean["map_at_10"],
           "mrr@10": clean["mrr_at_10"], "n": task.ettin_num_queries}
    out["mteb"] = clean
    return out


# ----------------------------------------------------------------------------------------------
# python -m ettin.eval.ecosystem tasks --data DIR --out TASK_DIR
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ettin.eval.ecosystem", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tasks", help="write the lm-eval task YAMLs for a data directory")
    t.add_argument("--data", required=True, help="data directory in the layout of ../shared/data")
    t.add_argument("--out", required=True, help="directory to write the YAMLs into (then: lm_eval --include_path OUT)")
    t.add_argument("--split", default="validation")
    t.add_argument("--tasks", default="all", help="comma-separated tasks or groups (mc, lm, qa, all)")
    t.add_argument("--model", default=None, help="an exported decoder directory: print the lm_eval command for it")
    args = p.parse_args(argv)
    try:
        out = render_lm_eval_tasks(args.data, args.out, split=args.split, tasks=args.tasks)
        print(f"wrote {len(resolve_lm_eval_tasks(args.tasks))} lm-eval tasks to {out}")
        if args.model:
            print(lm_eval_command(args.model, out, args.tasks))
    except EttinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
