"""Hugging Face interop: exported models compute what ours do, import undoes export, bad input fails cleanly.

Random-init tiny models (3 layers: one global, two local) on sequences longer than the local
window, for both sides, against transformers' own ModernBERT classes in fp32.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ettin import cli
from ettin.checkpoint import load_config, load_model, save_checkpoint
from ettin.config import preset, small_vocab_specials
from ettin.convert import hf as H
from ettin.errors import EttinError
from ettin.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

V = 256
L = 300  # longer than the 128-token window: local layers really differ from global ones
TOL = 1e-4


def make_model(causal: bool, seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose every parameter matters (non-zero bias, distinct thetas)."""
    torch.manual_seed(seed)
    kw = dict(rope_theta_global=10_000.0, rope_theta_local=2_500.0, **small_vocab_specials(V))
    kw.update(overrides)
    model = Transformer(preset("tiny", causal=causal, **kw))
    with torch.no_grad():
        model.out_bias.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def make_tokenizer(path: Path) -> Path:
    """A word-level tokenizer laid out like ours: [CLS] [SEP] [PAD] [MASK] at 0-3, documents as [CLS] text [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"] + [f"w{i}" for i in range(V - 5)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def tokdir(work) -> Path:
    return make_tokenizer(work / "tok")


@pytest.fixture(scope="module", params=[False, True], ids=["encoder", "decoder"])
def exported(request, work, tokdir):
    """(our model, checkpoint dir, export dir) for each side."""
    causal = request.param
    model = make_model(causal)
    ckpt = save_checkpoint(work / f"ckpt-{model.config.kind}", model, meta={"step": 7, "tokens": 7000}, tokenizer_dir=tokdir)
    out = H.export_checkpoint(ckpt, work / f"export-{model.config.kind}")
    return model, ckpt, out


def hf_load(path: Path, causal: bool, impl: str):
    cls = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()


def assert_parity(ours: Transformer, theirs, length: int = L) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 57 :] = 0  # right padding on the second row
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
        ap, bp = ours(ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL
    real = mask.bool()
    assert (ap[real] - bp[real]).abs().max().item() <= TOL


# -- parity --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_logits_match_transformers(exported, impl):
    model, _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("modernbert-decoder" if model.config.causal else "modernbert")
    assert cfg["architectures"] == [H.DECODER_ARCH if model.config.causal else H.ENCODER_ARCH]
    assert set(cfg["layer_types"]) == {"full_attention", "sliding_attention"}
    assert (cfg["global_rope_theta"], cfg["local_rope_theta"]) == (10_000.0, 2_500.0)  # for transformers 4.x readers
    hf = hf_load(out, model.config.causal, impl)
    assert type(hf).__name__ == cfg["architectures"][0]
    assert hf.config.rope_parameters["sliding_attention"]["rope_theta"] == 2_500.0
    assert_parity(model, hf)


@pytest.mark.parametrize(
    "causal,window",
    [(False, (32, 32)), (True, (64, 0))],  # a narrower encoder window; the flash-attention (64, 0) decoder window
    ids=["encoder-32", "decoder-flash64"],
)
def test_nondefault_expressible_windows_export_faithfully(work, causal, window):
    model = make_model(causal, seed=3, window_left=window[0], window_right=window[1])
    ckpt = save_checkpoint(work / f"win-{causal}", model)
    out = H.export_checkpoint(ckpt, work / f"win-{causal}-hf")
    assert_parity(model, hf_load(out, causal, "sdpa"), length=200)
    back = H.import_hf(out, work / f"win-{causal}-back")
    assert load_config(back) == model.config


def test_inexpressible_window_is_refused(work):
    model = make_model(False, window_left=64, window_right=8)
    ckpt = save_checkpoint(work / "lopsided", model)
    with pytest.raises(EttinError, match="symmetric window"):
        H.export_checkpoint(ckpt, work / "lopsided-hf")
    assert not (work / "lopsided-hf").exists()


# -- round trip ----------------------------------------------------------------------------
def test_import_of_export_is_identity(exported, work):
    model, ckpt, out = exported
    back = H.import_hf(out, work / f"back-{model.config.kind}")
    assert load_config(back) == model.config
    mine, theirs = model.state_dict(), load_model(back).state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    assert (back / "tokenizer" / "tokenizer.json").is_file()
    assert not (back / "tokenizer" / "config.json").exists()  # only tokenizer files are copied
    meta = json.loads((back / "ettin.json").read_text())["meta"]
    assert meta["source_meta"] == {"step": 7, "tokens": 7000}


def test_import_without_ettin_block_gives_same_network(exported, work):
    """A directory edited by other tools (our block gone) still imports to the same model."""
    model, _, out = exported
    stripped = work / f"stripped-{model.config.kind}"
    shutil.copytree(out, stripped, dirs_exist_ok=True)
    cfg = json.loads((stripped / "config.json").read_text())
    del cfg["ettin"]
    (stripped / "config.json").write_text(json.dumps(cfg))
    m2 = H.load_hf_as_model(stripped)
    c1, c2 = model.config, m2.config
    assert H._semantics(c1) == H._semantics(c2)
    assert c2.origin.startswith("hf:") and c2.objective == c1.objective
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_state_dict_adapters_invert():
    for causal in (False, True):
        model = make_model(causal)
        hf_state = H.to_hf_state_dict(model)
        assert "decoder.weight" not in hf_state and "decoder.bias" in hf_state
        assert ("model.layers.0.attn.q_proj.weight" in hf_state) == causal
        back = H.from_hf_state_dict(hf_state, model.config)
        assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
        cfg = H.hf_config_for(model.config)
        assert type(cfg).__name__ == ("ModernBertDecoderConfig" if causal else "ModernBertConfig")
        assert cfg.tie_word_embeddings and cfg.decoder_bias and not cfg.attention_bias and not cfg.mlp_bias


# -- what ships with an export ---------------------------------------------------------------
def test_export_tokenizer_loads_offline(exported):
    model, _, out = exported
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token == "[UNK]"
    # encoders read "[CLS] text [SEP]"; decoders "[CLS] text" (generation and lm-eval continue it)
    assert tok("w1 w2")["input_ids"] == ([0, 6, 7] if model.config.causal else [0, 6, 7, 1])
    assert tok.model_max_length == model.config.max_seq_len
    assert "token_type_ids" not in tok("w1")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_export_readme_and_sentence_transformers_files(exported):
    model, _, out = exported
    readme = (out / "README.md").read_text()
    assert model.config.kind in readme and "objective: **" + model.config.objective in readme
    if model.config.causal:
        assert not (out / "modules.json").exists()
        return
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == model.config.hidden
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == model.config.max_seq_len
    # sentence-transformers loads the backbone with AutoModel: it must find every weight.
    backbone, info = AutoModel.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"]
    ids = torch.randint(4, V, (1, 200))
    with torch.no_grad():
        assert (backbone.eval()(input_ids=ids).last_hidden_state - model.encode(ids)).abs().max() <= TOL


def test_sentence_transformers_loads_export(work, tokdir):
    st = pytest.importorskip("sentence_transformers")
    model = make_model(False, seed=2)
    out = H.export_checkpoint(save_checkpoint(work / "st", model, tokenizer_dir=tokdir), work / "st-hf")
    emb = st.SentenceTransformer(str(out), device="cpu").encode(["w1 w2 w3"], convert_to_tensor=True)
    with torch.no_grad():
        ref = model.encode(torch.tensor([[0, 6, 7, 8, 1]])).mean(dim=1)
    assert (emb - ref).abs().max() <= 1e-4


def test_mntp_export_readme_says_shifted(work):
    model = make_model(False, objective="mntp", origin="decoder ckpt-x via MNTP")
    out = H.export_checkpoint(save_checkpoint(work / "mntp", model), work / "mntp-hf")
    readme = (out / "README.md").read_text()
    assert "mntp" in readme and "i-1" in readme and "decoder ckpt-x via MNTP" in readme
    assert load_config(H.import_hf(out, work / "mntp-back")).objective == "mntp"


# -- foreign directories -----------------------------------------------------------------------
OLD_ENCODER_CONFIG = {  # as transformers 4.48 wrote answerdotai/ModernBERT-base (dimensions shrunk)
    "architectures": ["ModernBertForMaskedLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "classifier_activation": "gelu",
    "classifier_bias": False,
    "classifier_dropout": 0.0,
    "classifier_pooling": "mean",
    "cls_token_id": 0,
    "decoder_bias": True,
    "deterministic_flash_attn": False,
    "embedding_dropout": 0.0,
    "eos_token_id": 1,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0,
    "gradient_checkpointing": False,
    "hidden_activation": "gelu",
    "hidden_size": 64,
    "initializer_cutoff_factor": 2.0,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "layer_norm_eps": 1e-05,
    "local_attention": 128,
    "local_rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "mlp_dropout": 0.0,
    "model_type": "modernbert",
    "norm_bias": False,
    "norm_eps": 1e-05,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "pad_token_id": 2,
    "position_embedding_type": "absolute",
    "reference_compile": True,
    "sep_token_id": 1,
    "sparse_pred_ignore_index": -100,
    "sparse_prediction": False,
    "torch_dtype": "float32",
    "transformers_version": "4.48.0",
    "vocab_size": V,
}


def write_foreign(path: Path, config: dict, state: dict, tokenizer: Path | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copy(tokenizer / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_old_style_config_imports(work, tokdir, causal):
    """transformers 4.x configs (global/local_rope_theta, no rope_parameters); mask id from tokenizer.json."""
    model = make_model(causal, rope_theta_global=160_000.0, rope_theta_local=10_000.0)
    config = dict(OLD_ENCODER_CONFIG)
    if causal:
        config.update(architectures=["ModernBertDecoderForCausalLM"], model_type="modernbert-decoder", local_rope_theta=10000.0)
        for k in ("classifier_pooling", "deterministic_flash_attn", "sparse_prediction", "sparse_pred_ignore_index"):
            config.pop(k)
    state = H.to_hf_state_dict(model)
    state["decoder.weight"] = state["model.embeddings.tok_embeddings.weight"].clone()  # some saves keep the tied copy
    src = write_foreign(work / f"old-{causal}", config, state, tokenizer=tokdir)
    ckpt = H.import_hf(src, work / f"old-{causal}-ckpt")
    ours = load_model(ckpt).eval()
    c = ours.config
    assert (c.rope_theta_global, c.rope_theta_local, c.global_every, c.local_attention) == (160_000.0, 10_000.0, 3, 128)
    assert (c.cls_id, c.sep_id, c.pad_id, c.mask_id) == (0, 1, 2, 3)  # mask from tokenizer.json's [MASK]
    assert c.causal == causal and c.origin.startswith("hf:")
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    assert_parity(ours, hf_load(src, causal, "sdpa"))  # transformers 5 reads the old config the same way


def test_modernbert_default_mask_id_without_tokenizer():
    cfg = dict(OLD_ENCODER_CONFIG, vocab_size=50368, bos_token_id=50281, cls_token_id=50281, eos_token_id=50282, sep_token_id=50282, pad_token_id=50283)
    c = H.config_from_hf(cfg)
    assert (c.cls_id, c.sep_id, c.pad_id, c.mask_id) == (50281, 50282, 50283, 50284)
    assert c.objective == "mlm" and not c.causal


@pytest.mark.parametrize(
    "change,words",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_activation": "gelu_pytorch_tanh"}, "exact GELU"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4}}}, "yarn"),
        ({"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, "global every N"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({"num_hidden_layers": "3"}, "num_hidden_layers"),
    ],
)
def test_unrepresentable_configs_are_named(change, words):
    with pytest.raises(EttinError, match=words):
        H.config_from_hf(dict(OLD_ENCODER_CONFIG, mask_token_id=3, **change))


def test_edited_ettin_block_loses_to_transformers_fields(exported):
    model, _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"]["sliding_attention"]["rope_theta"] = 777.0  # edited by hand after export
    got = H.config_from_hf(cfg)
    assert got.rope_theta_local == 777.0 and got.name == model.config.name


def test_headless_backbone_imports_with_random_head(work, capsys):
    """ModernBertModel (no 'model.' prefix, no head): backbone kept, head random, a warning printed."""
    model = make_model(False, seed=11)
    state = {k[len("model."):]: v for k, v in H.to_hf_state_dict(model).items() if k.startswith("model.")}
    config = dict(OLD_ENCODER_CONFIG, architectures=["ModernBertModel"], mask_token_id=3)
    src = write_foreign(work / "headless", config, state)
    capsys.readouterr()
    ckpt = H.import_hf(src, work / "headless-ckpt")
    assert "initialised randomly" in capsys.readouterr().err
    got = load_model(ckpt).state_dict()
    for k, v in model.state_dict().items():
        if k not in H.HEAD_KEYS:
            assert torch.equal(v, got[k]), k
    assert not torch.equal(model.head_dense.weight, got["head_dense.weight"])


def test_sharded_and_bin_weights(work):
    model = make_model(True)
    hf_state = H.to_hf_state_dict(model)
    config = json.loads(json.dumps(H.hf_config_dict(model.config)))
    # sharded safetensors with an index
    sharded = work / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config))
    keys = sorted(hf_state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: hf_state[k].contiguous() for k in ks}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in halves.items() for k in ks}}))
    # a weights-only pytorch_model.bin
    binary = work / "binary"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps(config))
    torch.save(hf_state, binary / "pytorch_model.bin")
    for src in (sharded, binary):
        m = H.load_hf_as_model(src)
        assert m.config == model.config
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in model.state_dict().items())


def test_bin_with_code_is_refused(work):
    """A pickle that would run code is rejected by weights_only loading, not executed."""
    bad = work / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(OLD_ENCODER_CONFIG))
    torch.save({"x": torch.zeros(1), "f": print}, bad / "pytorch_model.bin")  # print: a callable, not a tensor
    with pytest.raises(EttinError, match="weights_only"):
        H.read_hf_weights(bad)


# -- bad input through the command line ------------------------------------------------------
def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real ``ettin`` entry point in-process (cli.main: EttinError -> one line, exit 1)."""
    monkeypatch.setattr(sys, "argv", ["ettin", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _bad_cases(work: Path, exported_dirs: dict) -> dict:
    """name -> (argv, expected words in the message)."""
    ckpt = exported_dirs["ckpt"]
    trunc = work / "bad-trunc"
    shutil.copytree(ckpt, trunc, dirs_exist_ok=True)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    bert = work / "bad-bert"
    bert.mkdir(exist_ok=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64}))
    noweights = work / "bad-noweights"
    noweights.mkdir(exist_ok=True)
    (noweights / "config.json").write_text(json.dumps(dict(OLD_ENCODER_CONFIG, mask_token_id=3)))
    trunc_hf = work / "bad-trunc-hf"
    shutil.copytree(exported_dirs["export"], trunc_hf, dirs_exist_ok=True)
    w = trunc_hf / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    pair = work / "bad-pair"
    for side in ("encoder", "decoder"):
        shutil.copytree(ckpt, pair / side / "checkpoints" / "1", dirs_exist_ok=True)
    return {
        "export-missing": (["export", work / "nope"], "no such checkpoint"),
        "export-truncated": (["export", trunc], "truncated"),
        "export-pair": (["export", pair], f"use {pair / 'encoder'} or {pair / 'decoder'}"),
        "import-bert": (["import", bert], "BertForMaskedLM"),
        "import-no-weights": (["import", noweights], "no weights"),
        "import-truncated": (["import", trunc_hf], "truncated"),
        "import-no-config": (["import", ckpt], "already an ettin checkpoint"),
        "import-missing": (["import", work / "nope"], "no such checkpoint, run directory or Hugging Face directory"),
    }


BAD = ["export-missing", "export-truncated", "export-pair", "import-bert", "import-no-weights", "import-truncated", "import-no-config", "import-missing"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_error_nothing_written(case, work, tokdir, monkeypatch, capsys):
    model = make_model(False)
    ckpt = save_checkpoint(work / "bad-src", model, tokenizer_dir=tokdir)
    export = work / "bad-src-hf"
    if not export.exists():
        H.export_checkpoint(ckpt, export)
    argv, words = _bad_cases(work, {"ckpt": ckpt, "export": export})[case]
    out = work / f"out-{case}"
    code, _, err = run_cli(monkeypatch, capsys, *argv, "--out", out)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(f".out-{case}")]  # no temporary left over


def test_refuses_to_overwrite_foreign_directory(work, monkeypatch, capsys):
    model = make_model(True)
    ckpt = save_checkpoint(work / "ow-src", model)
    precious = work / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "export", ckpt, "--out", precious)
    assert code == 1 and "--force" in err and (precious / "notes.txt").read_text() == "keep me"
    code, out, _ = run_cli(monkeypatch, capsys, "export", ckpt, "--out", work / "ow-hf")
    assert code == 0 and "wrote" in out
    code, _, _ = run_cli(monkeypatch, capsys, "export", ckpt, "--out", work / "ow-hf")  # our own export: replaced
    assert code == 0


def test_installed_command_round_trip(work):
    """The console script itself: import an export, one subprocess per direction."""
    model = make_model(True, seed=5)
    ckpt = save_checkpoint(work / "sub-src", model)
    env_bin = Path(sys.executable).parent
    exe = str(env_bin / "ettin") if (env_bin / "ettin").exists() else None
    base = [exe] if exe else [sys.executable, "-m", "ettin"]
    r = subprocess.run(base + ["export", str(ckpt), "--out", str(work / "sub-hf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["import", str(work / "nope"), "--out", str(work / "sub-back")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert load_file(str(work / "sub-hf" / "model.safetensors"))["decoder.bias"].shape == (V,)
