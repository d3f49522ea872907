"""Exported models in the ecosystem, offline: sentence-transformers, MTEB (custom local retrieval
task) and lm-evaluation-harness (`--model hf` on the task YAMLs we ship), each checked against
numbers computed independently with our own model."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ettin.errors import EttinError
from ettin.eval import ecosystem as eco

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEXTS = [
    "The cat sat on the mat and purred while the dog slept by the fire.",
    "Markets fell sharply on Monday as investors worried about interest rates and inflation.",
    "Heavy rain flooded the streets of the old city, and the river rose above its banks.",
    "The grandmaster won the chess game in twenty moves with a surprising queen sacrifice.",
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models: one thread is plenty, and two threads on a busy 2-core machine are ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny tokenizer, a micro encoder and decoder as our checkpoints and as HF exports."""
    from ettin.checkpoint import save_checkpoint
    from ettin.config import preset
    from ettin.convert.hf import export_checkpoint
    from ettin.data.tokenizer import model_overrides, train_tokenizer
    from ettin.model import Transformer

    root = tmp_path_factory.mktemp("eco")
    train_tokenizer(TEXTS * 20, root / "tok", 400)
    ov = model_overrides(root / "tok")
    out = {"root": root, "tok": root / "tok"}
    for kind, causal in (("encoder", False), ("decoder", True)):
        torch.manual_seed(1 if causal else 2)
        model = Transformer(preset("micro", causal=causal, **ov))
        save_checkpoint(root / f"{kind}_ckpt", model, meta={"step": 3, "tokens": 300}, tokenizer_dir=root / "tok")
        export_checkpoint(root / f"{kind}_ckpt", root / f"{kind}_hf")
        out[kind] = {"ckpt": root / f"{kind}_ckpt", "hf": root / f"{kind}_hf"}
    return out


def _our_model(ckpt: Path):
    from ettin.checkpoint import load_model

    m = load_model(ckpt)
    m.eval()
    return m


def _raw_tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


# -- lm-eval task YAMLs ----------------------------------------------------------------------------

def _yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=Loader)


def test_rendered_tasks_point_at_the_shared_data(shared_data, tmp_path):
    out = eco.render_lm_eval_tasks(shared_data, tmp_path / "tasks")
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{lm}.yaml" for lm, _ in eco.LM_EVAL_TASKS.values()] + ["ettin_utils.py"])
    import glob

    for lm, sub in eco.LM_EVAL_TASKS.values():
        cfg = _yaml(out / f"{lm}.yaml")
        assert cfg["task"] == lm and cfg["dataset_path"] == "json" and cfg["validation_split"] == "validation"
        pattern = cfg["dataset_kwargs"]["data_files"]["validation"]
        matched = sorted(glob.glob(pattern))
        assert matched == sorted(str(p) for p in Path(shared_data, sub).resolve().glob("validation*.jsonl")) and matched
        assert "@" not in json.dumps(cfg)
    hs = glob.glob(_yaml(out / "ettin_hellaswag.yaml")["dataset_kwargs"]["data_files"]["validation"])
    assert len(hs) == 2  # both shards
    # templates stay templates; groups resolve; bad names and missing data are one-line errors
    assert "@DATA@" in (eco.lm_eval_tasks_dir() / "ettin_arc_easy.yaml").read_text()
    assert eco.resolve_lm_eval_tasks("lm,ettin_piqa,qa") == ["lambada_openai", "wikitext2", "piqa", "triviaqa"]
    assert len(eco.resolve_lm_eval_tasks("mc")) == 8
    with pytest.raises(EttinError, match=r"unknown lm-eval task 'mmlu': known are arc_easy, "):
        eco.resolve_lm_eval_tasks("mmlu")
    (tmp_path / "d" / "mc").mkdir(parents=True)
    with pytest.raises(EttinError, match=r"d/mc/piqa/validation\*\.jsonl: no such file"):
        eco.render_lm_eval_tasks(tmp_path / "d", tmp_path / "t2", tasks="piqa")


def test_tasks_cli(shared_data, exported, tmp_path):  # the `python -m` entry point, in a subprocess
    p = subprocess.run([sys.executable, "-m", "ettin.eval.ecosystem", "tasks", "--data", shared_data, "--out", str(tmp_path / "t"),
                        "--tasks", "mc", "--model", str(exported["decoder"]["hf"])], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == f"wrote 8 lm-eval tasks to {tmp_path / 't'}"
    assert lines[1].startswith("lm_eval --model hf --model_args pretrained=") and "add_bos_token=True" in lines[1]
    assert f"--include_path {(tmp_path / 't').resolve()}" in lines[1] and "ettin_winogrande" in lines[1]


def test_tasks_cli_bad_data(tmp_path, capsys):
    assert eco.main(["tasks", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {(tmp_path / 'nope').resolve()}: no such data directory\n"
    assert eco.main(["tasks", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--tasks", "mmlu"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown lm-eval task 'mmlu'")


# -- lm-evaluation-harness -------------------------------------------------------------------------

def _our_loglik(model, tok, cls_id: int, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | [CLS] context) with our model, tokenized as lm-eval does (whole, then split)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = [cls_id] + tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = [cls_id] + tok.encode(context, add_special_tokens=False).ids
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), dim=-1)[0, -len(cont):]
    tgt = torch.tensor(cont)
    return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def test_lm_eval_runs_exported_decoder(exported, shared_data):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    out = eco.run_lm_eval(exported["decoder"]["hf"], shared_data, tasks="all", limit=3, max_length=256, log_samples=True)
    res = out["results"]
    assert set(res) == set(eco.LM_EVAL_TASKS)
    for task in eco.LM_EVAL_GROUPS["mc"]:
        assert set(res[task]) == {"acc", "acc_norm", "n"} and res[task]["n"] == 3
    assert set(res["lambada_openai"]) == {"acc", "perplexity", "n"}
    assert set(res["wikitext2"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte", "n"}
    assert set(res["triviaqa"]) == {"exact_match", "n"}
    assert math.isclose(res["wikitext2"]["bits_per_byte"], math.log2(res["wikitext2"]["byte_perplexity"]), rel_tol=1e-9)

    # every log-likelihood lm-eval got from the HF export equals our own model's, token for token
    model = _our_model(exported["decoder"]["ckpt"])
    tok = _raw_tokenizer(exported["tok"])
    samples = out["lm_eval"]["samples"]
    checked = 0
    for lm_task in ("ettin_arc_easy", "ettin_winogrande", "ettin_hellaswag", "ettin_lambada_openai"):
        for s in samples[lm_task]:
            ours = [_our_loglik(model, tok, model.config.cls_id, c, x) for c, x in s["arguments"]]
            theirs = [r[0] for r in s["resps"]]
            for (ll, greedy), (tll, tgreedy) in zip(ours, theirs):
                assert abs(ll - tll) < 1e-3 and greedy == tgreedy, (lm_task, ll, tll)
                checked += 1
            if lm_task != "ettin_lambada_openai":
                lls = [o[0] for o in ours]
                gold = s["target"] if isinstance(s["target"], int) else s["doc"]["label"]
                assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)
                if lm_task != "ettin_winogrande":
                    norm = [ll / len(x) for ll, (_, x) in zip(lls, s["arguments"])]
                    assert s["acc_norm"] == float(max(range(len(norm)), key=norm.__getitem__) == gold)
    assert checked == 3 * (4 + 2 + 4 + 1)
    arc = samples["ettin_arc_easy"]
    assert res["arc_easy"]["acc"] == pytest.approx(sum(s["acc"] for s in arc) / 3)


# -- sentence-transformers / MTEB ------------------------------------------------------------------

def _our_embeddings(exported, sentences: list[str]) -> torch.Tensor:
    model = _our_model(exported["encoder"]["ckpt"])
    tok = _raw_tokenizer(exported["tok"])
    out = []
    for s in sentences:
        ids = torch.tensor([tok.encode(s).ids])  # [CLS] text [SEP], as the export's tokenizer adds them
        with torch.no_grad():
            out.append(model.encode(ids)[0].mean(0))
    return torch.stack(out)


def test_sentence_transformers_loads_exported_encoder(exported):
    pytest.importorskip("sentence_transformers")
    st = eco.load_sentence_transformer(exported["encoder"]["hf"])
    sentences = TEXTS + [" ".join(TEXTS)]  # the last one is longer than the local window (64 each side)
    assert len(_raw_tokenizer(exported["tok"]).encode(sentences[-1]).ids) > 130
    emb = torch.from_numpy(eco.encode_sentences(st, sentences, batch_size=4))  # batched: padding must not leak in
    ours = _our_embeddings(exported, sentences)
    assert emb.shape == (len(sentences), 32)
    assert torch.allclose(emb, ours, atol=2e-5, rtol=1e-4), (emb - ours).abs().max()
    with pytest.raises(EttinError, match="no modules.json"):
        eco.load_sentence_transformer(exported["decoder"]["hf"])
    with pytest.raises(EttinError, match=r"not a Hugging Face model directory.*ettin export"):
        eco.load_sentence_transformer(exported["encoder"]["ckpt"])


def _write_beir(d: Path) -> tuple[list, dict, dict]:
    docs = [("d1", "Cats", TEXTS[0]), ("d2", "", TEXTS[1]), ("d3", "Weather", TEXTS[2]), ("d4", "Chess", TEXTS[3]),
            ("d5", "Quiz", TEXTS[4]), ("d6", "", "An unrelated note about gardening tools and spring bulbs.")]
    queries = {"q1": "where did the cat sit", "q2": "why did markets fall", "q3": "flooded streets", "q4": "chess sacrifice",
               "q5": "a query without judgements in this split"}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d6": 1}, "q3": {"d3": 2}, "q4": {"d4": 1}}
    (d / "qrels").mkdir(parents=True)
    with gzip.open(d / "corpus.jsonl.gz", "wt") as fh:
        for i, t, x in docs:
            fh.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{doc}\t{s}\n" for q, r in qrels.items() for doc, s in r.items()))
    return docs, queries, qrels


def _ndcg_recall(q_emb, d_emb, qids, dids, qrels, k=10, rk=100):
    q = torch.nn.functional.normalize(q_emb, dim=-1)
    d = torch.nn.functional.normalize(d_emb, dim=-1)
    sims = q @ d.T
    nd, rc = [], []
    for i, qid in enumerate(qids):
        order = [dids[j] for j in sims[i].argsort(descending=True).tolist()]
        rel = qrels[qid]
        dcg = sum(rel.get(doc, 0) / math.log2(r + 2) for r, doc in enumerate(order[:k]))
        ideal = sorted(rel.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        nd.append(dcg / idcg)
        rc.append(sum(1 for doc in order[:rk] if rel.get(doc, 0) > 0) / sum(1 for g in rel.values() if g > 0))
    return sum(nd) / len(nd), sum(rc) / len(rc)


def test_mteb_custom_retrieval_on_local_beir(exported, tmp_path):
    pytest.importorskip("mteb")
    docs, queries, qrels = _write_beir(tmp_path / "toy")
    st = eco.load_sentence_transformer(exported["encoder"]["hf"])
    res = eco.run_mteb_retrieval(st, tmp_path / "toy", "dev")
    assert res["n"] == 4  # only queries judged in this split
    # independent: rank with our own model's embeddings (MTEB embeds a document as "title text")
    qids = list(qrels)
    dids = [i for i, _, _ in docs]
    q_emb = _our_embeddings(exported, [queries[q] for q in qids])
    d_emb = _our_embeddings(exported, [f"{t} {x}".strip() if t else x for _, t, x in docs])
    ndcg, recall = _ndcg_recall(q_emb, d_emb, qids, dids, qrels)
    assert res["ndcg@10"] == pytest.approx(ndcg, abs=1e-4)
    assert res["recall@100"] == pytest.approx(recall, abs=1e-4) and recall == 1.0
    assert 0 < res["ndcg@10"] <= 1 and res["mteb"]["main_score"] == res["ndcg@10"]


def test_beir_bad_input(tmp_path):
    d = tmp_path / "bad"
    _write_beir(d)
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\tnope\t1\n")
    with pytest.raises(EttinError, match=r"qrels/dev\.tsv:3: document 'nope' is not in corpus\.jsonl\.gz"):
        eco.read_beir(d, "dev")
    with pytest.raises(EttinError, match=r"qrels/test\.tsv: no such file"):
        eco.read_beir(d, "test")
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    corpus, queries, qrels = eco.read_beir(d, "dev")
    assert list(queries) == ["q1"] and qrels == {"q1": {"d1": 1}} and corpus["d2"]["title"] == ""
