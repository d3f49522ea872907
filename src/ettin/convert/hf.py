"""Hugging Face interop: our checkpoints <-> transformers' ModernBERT directories.

Encoders map to ``ModernBertForMaskedLM`` (fused ``attn.Wqkv``, head ``head.{dense,norm}``),
decoders to ``ModernBertDecoderForCausalLM`` (``q_proj/k_proj/v_proj``, head
``lm_head.{dense,norm}``); both tie ``decoder.weight`` to the token embedding and keep a separate
``decoder.bias`` (our ``out_bias``).

Importing never runs code from the directory it reads: ``config.json`` is parsed here (not by
transformers, so ``auto_map``/remote code is never consulted) and weights come from safetensors,
or from ``pytorch_model.bin`` through ``torch.load(weights_only=True)``. Configs written by
transformers 4.x (``global_rope_theta``/``local_rope_theta``/``global_attn_every_n_layers``) and
5.x (``rope_parameters``/``layer_types``) are both understood.

An export also carries our full model config under the ``"ettin"`` key of ``config.json``;
transformers ignores it, and an import uses it only when it describes the same network as the
transformers fields (so import after export gives back the very same config).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ettin.config import MODERNBERT_SPECIALS, MODERNBERT_VOCAB, ModelConfig, PAPER_SIZES, preset
from ettin.errors import EttinError

ENCODER_TYPE = "modernbert"
DECODER_TYPE = "modernbert-decoder"
ENCODER_ARCH = "ModernBertForMaskedLM"
DECODER_ARCH = "ModernBertDecoderForCausalLM"
EXPORT_FORMAT = "ettin-hf-export"
EXPORT_VERSION = 1

# Files of a Hugging Face tokenizer that an import copies into CKPT/tokenizer/.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
# Our head parameters: absent from a headless source and then initialised randomly.
HEAD_KEYS = ("head_dense.weight", "head_norm.weight", "out_bias")
_DEFAULT_THETA = {"global": 160_000.0, "local": 10_000.0}  # transformers' defaults (4.x and 5.x)


def warn(msg: str) -> None:
    """A user-visible warning on stderr (the import still succeeds)."""
    print(f"warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# config translation
# ------------------------------------------------------------------------------------------
def _hf_local_attention(config: ModelConfig, source: str = "config") -> int:
    """The transformers ``local_attention`` that reproduces ``config.window()``, or EttinError."""
    if all(config.is_global_layer(i) for i in range(config.layers)):
        return config.local_attention  # no local layer: the window is never used
    left, right = config.window()
    if config.causal:
        # ModernBertDecoder: sliding_window = local_attention // 2, query i sees i-(sw-1) .. i.
        if left < 0:
            raise EttinError(f"{source}: decoder window left={left} cannot be expressed by transformers (needs left >= 0)")
        if config.local_attention // 2 - 1 == left:
            return config.local_attention
        return 2 * (left + 1)
    # ModernBert encoder: query i sees |i - j| <= local_attention // 2.
    if left != right or left < 0:
        raise EttinError(
            f"{source}: encoder window (left={left}, right={right}) cannot be expressed by transformers' ModernBERT, "
            "which needs a symmetric window (left == right >= 0); export refused"
        )
    if config.local_attention // 2 == left:
        return config.local_attention
    return 2 * left


def hf_config_dict(config: ModelConfig, *, meta: dict | None = None, source: str = "config") -> dict:
    """The ``config.json`` content (transformers 5.x layout) describing ``config`` faithfully."""
    layer_types = ["full_attention" if config.is_global_layer(i) else "sliding_attention" for i in range(config.layers)]
    d = {
        "architectures": [DECODER_ARCH if config.causal else ENCODER_ARCH],
        "model_type": DECODER_TYPE if config.causal else ENCODER_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "initializer_cutoff_factor": config.init_cutoff,
        "norm_eps": config.norm_eps,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "classifier_bias": False,
        "classifier_activation": "gelu",
        "decoder_bias": True,
        "tie_word_embeddings": True,
        "pad_token_id": config.pad_id,
        "bos_token_id": config.cls_id,
        "eos_token_id": config.sep_id,
        "cls_token_id": config.cls_id,
        "sep_token_id": config.sep_id,
        "mask_token_id": config.mask_id,
        # transformers' attention_dropout drops attention probabilities *and* the attention
        # output; ettin's attn_out_dropout only the output, so no transformers field says it.
        # Exports carry 0 (inference, as the released ModernBERT configs); the training value
        # stays in the "ettin" block below and comes back on import.
        "attention_dropout": 0.0,
        "embedding_dropout": 0.0,
        "mlp_dropout": 0.0,
        "layer_types": layer_types,
        "global_attn_every_n_layers": config.global_every,
        "local_attention": _hf_local_attention(config, source),
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": float(config.rope_theta_global)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(config.rope_theta_local)},
        },
        "ettin": {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": config.to_dict(), "meta": meta or {}},
    }
    if not config.causal:
        d["classifier_pooling"] = "mean"  # what sentence-transformers uses too; CLS sees only a window in local layers
    return d


def hf_config_for(config: ModelConfig, *, meta: dict | None = None, source: str = "config"):
    """A transformers ``ModernBertConfig`` / ``ModernBertDecoderConfig`` for ``config``."""
    from transformers import ModernBertConfig, ModernBertDecoderConfig

    d = hf_config_dict(config, meta=meta, source=source)
    d.pop("model_type")
    cls = ModernBertDecoderConfig if config.causal else ModernBertConfig
    return cls(**d)


def _layer_pattern(hf: dict, layers: int, source: str) -> int:
    """``global_every`` from ``layer_types`` (5.x) or ``global_attn_every_n_layers`` (4.x)."""
    declared = hf.get("global_attn_every_n_layers")
    lt = hf.get("layer_types")
    if lt is None:
        g = 3 if declared is None else declared
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
            raise EttinError(f"{source}: 'global_attn_every_n_layers' must be a positive integer, got {g!r}")
        return g
    if not isinstance(lt, list) or len(lt) != layers or any(t not in ("full_attention", "sliding_attention") for t in lt):
        raise EttinError(f"{source}: 'layer_types' must list 'full_attention'/'sliding_attention' for each of the {layers} layers")
    is_full = [t == "full_attention" for t in lt]
    candidates = ([declared] if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0 else []) + list(range(1, layers + 1))
    for g in candidates:
        if all(is_full[i] == (i % g == 0) for i in range(layers)):
            return g
    raise EttinError(f"{source}: layer_types {lt} is not 'global every N layers starting at layer 0', which ettin needs")


def _rope_thetas(hf: dict, source: str) -> tuple[float, float]:
    """(global, local) RoPE thetas from either config generation; only plain RoPE is accepted."""
    if hf.get("rope_scaling"):
        raise EttinError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported (plain RoPE only)")
    rp = hf.get("rope_parameters")
    old_global = hf.get("global_rope_theta", hf.get("rope_theta", _DEFAULT_THETA["global"]))
    if "local_rope_theta" in hf:
        old_local = hf["local_rope_theta"] if hf["local_rope_theta"] is not None else old_global  # 4.x: None = global theta
    else:
        old_local = _DEFAULT_THETA["local"]
    if rp is None:
        g, l = old_global, old_local
    else:
        if not isinstance(rp, dict):
            raise EttinError(f"{source}: 'rope_parameters' must be an object")
        if "full_attention" in rp or "sliding_attention" in rp:
            full, slide = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        else:
            full = slide = rp
        for part in (full, slide):
            if part.get("rope_type", "default") != "default":
                raise EttinError(f"{source}: rope_type {part.get('rope_type')!r} is not supported (plain RoPE only)")
        g = full.get("rope_theta", old_global)
        l = slide.get("rope_theta", old_local)
    try:
        return float(g), float(l)
    except (TypeError, ValueError):
        raise EttinError(f"{source}: RoPE thetas must be numbers, got {g!r} and {l!r}") from None


def _token_id(tokenizer_json: dict | None, names: tuple[str, ...]) -> int | None:
    """Id of the first of ``names`` in a tokenizer.json (added tokens first, then the vocabulary)."""
    if not tokenizer_json:
        return None
    added = {t.get("content"): t.get("id") for t in tokenizer_json.get("added_tokens") or [] if isinstance(t, dict)}
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    for n in names:
        if isinstance(added.get(n), int):
            return added[n]
        if isinstance(vocab, dict) and isinstance(vocab.get(n), int):
            return vocab[n]
    return None


def _special_ids(hf: dict, vocab: int, causal: bool, tokenizer_json: dict | None, source: str) -> dict:
    """cls/sep/pad/mask ids: config.json first, then the tokenizer, then ModernBERT's defaults."""
    def pick(keys: tuple[str, ...], tokens: tuple[str, ...], name: str) -> int | None:
        for k in keys:
            v = hf.get(k)
            if isinstance(v, list) and v:
                v = v[0]
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab:
                return v
        v = _token_id(tokenizer_json, tokens)
        if v is not None and 0 <= v < vocab:
            return v
        if vocab == MODERNBERT_VOCAB:
            return MODERNBERT_SPECIALS[name]
        return None

    ids = {
        "cls_id": pick(("cls_token_id", "bos_token_id"), ("[CLS]", "<s>", "<|begin_of_text|>"), "cls_id"),
        "sep_id": pick(("sep_token_id", "eos_token_id"), ("[SEP]", "</s>", "<|end_of_text|>"), "sep_id"),
        "pad_id": pick(("pad_token_id",), ("[PAD]", "<pad>"), "pad_id"),
        "mask_id": pick(("mask_token_id",), ("[MASK]", "<mask>"), "mask_id"),
    }
    for name in ("cls_id", "sep_id", "pad_id"):
        if ids[name] is None:
            raise EttinError(f"{source}: cannot determine the {name[:-3].upper()} token id (not in config.json nor tokenizer.json)")
    if ids["mask_id"] is None:
        if not causal:
            raise EttinError(f"{source}: cannot determine the MASK token id (no mask_token_id in config.json, no [MASK] in tokenizer.json)")
        warn(f"{source}: no mask token id found; using the PAD id {ids['pad_id']} (only MNTP conversion uses it)")
        ids["mask_id"] = ids["pad_id"]
    return ids


def _require_false(hf: dict, keys: tuple[str, ...], source: str) -> None:
    for k in keys:
        if hf.get(k):
            raise EttinError(f"{source}: '{k}' is true; ettin's architecture has no biases there")


def _preset_name(layers: int, hidden: int, inter: int, heads: int) -> str:
    for name in PAPER_SIZES:
        p = preset(name)
        if (p.layers, p.hidden, p.intermediate, p.heads) == (layers, hidden, inter, heads):
            return name
    return "custom"


def _semantics(c: ModelConfig) -> tuple:
    """What transformers would compute with: equal tuples mean the same network and specials."""
    pattern = tuple(c.is_global_layer(i) for i in range(c.layers))
    window = c.window() if not all(pattern) else None
    return (
        c.layers, c.hidden, c.intermediate, c.heads, c.vocab_size, c.causal, pattern, window,
        float(c.rope_theta_global), float(c.rope_theta_local) if not all(pattern) else None,
        c.norm_eps, c.max_seq_len, c.special_ids, c.init_std, c.init_cutoff,
    )  # fmt: skip


def model_kind(hf: dict, source: str = "config.json") -> tuple[bool, str]:
    """(causal, architecture) for a ModernBERT-style config.json, or an EttinError naming what was found."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [str(archs)]
    arch = str(archs[0]) if archs else ""
    if mt == DECODER_TYPE or (mt is None and arch.startswith("ModernBertDecoder")):
        return True, arch or "ModernBertDecoderModel"
    if mt == ENCODER_TYPE or (mt is None and arch.startswith("ModernBert")):
        if arch.startswith("ModernBertDecoder"):
            return True, arch
        return False, arch or "ModernBertModel"
    found = f"model_type {mt!r}" + (f", architectures {archs}" if archs else "")
    raise EttinError(f"{source}: {found} is not ModernBERT-style; ettin imports model_type 'modernbert' (encoders) and 'modernbert-decoder' (decoders)")


def _attn_out_dropout(hf: dict, source: str) -> float:
    """transformers' ``attention_dropout`` as our attention-output dropout (the part we have)."""
    vals = {}
    for k in ("attention_dropout", "embedding_dropout", "mlp_dropout"):
        v = hf.get(k, 0.0)
        if v is None:
            v = 0.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise EttinError(f"{source}: '{k}' must be a probability in [0, 1), got {v!r}")
        vals[k] = float(v)
    if vals["attention_dropout"] > 0:
        warn(f"{source}: attention_dropout {vals['attention_dropout']} becomes ettin's attn_out_dropout (attention output only; "
             "ettin has no dropout on attention probabilities)")
    for k in ("embedding_dropout", "mlp_dropout"):
        if vals[k] > 0:
            warn(f"{source}: {k} {vals[k]} is ignored (ettin has dropout on attention outputs only)")
    return vals["attention_dropout"]


def config_from_hf(hf: dict, *, source: str = "config.json", tokenizer_json: dict | None = None, origin: str | None = None) -> ModelConfig:
    """Our ModelConfig from a parsed transformers config.json (4.x or 5.x), checking what we can't represent."""
    if not isinstance(hf, dict):
        raise EttinError(f"{source}: expected a JSON object")
    causal, arch = model_kind(hf, source)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        v = hf.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise EttinError(f"{source}: '{k}' must be a positive integer, got {v!r}")
    layers, hidden, inter, heads, vocab = (hf[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"))
    _require_false(hf, ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias"), source)
    for k in ("hidden_activation", "classifier_activation"):
        if hf.get(k, "gelu") != "gelu":
            raise EttinError(f"{source}: '{k}' is {hf[k]!r}; ettin uses exact GELU ('gelu')")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise EttinError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({hidden // heads})")
    global_every = _layer_pattern(hf, layers, source)
    local = hf.get("local_attention", 2 * hf["sliding_window"] if isinstance(hf.get("sliding_window"), int) else 128)
    has_local = any(i % global_every for i in range(layers))
    if not isinstance(local, int) or isinstance(local, bool) or local <= 0:
        if has_local:
            raise EttinError(f"{source}: 'local_attention' must be a positive integer for sliding-attention layers, got {local!r}")
        local = 128
    if causal and has_local and local // 2 < 1:
        raise EttinError(f"{source}: local_attention {local} gives an empty decoder window")
    theta_g, theta_l = _rope_thetas(hf, source)
    dropout = _attn_out_dropout(hf, source)
    specials = _special_ids(hf, vocab, causal, tokenizer_json, source)
    try:
        numbers = dict(
            norm_eps=float(hf.get("norm_eps", 1e-5)),
            init_std=float(hf.get("initializer_range", 0.02)),
            init_cutoff=float(hf.get("initializer_cutoff_factor") or 2.0),
            max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        )
    except (TypeError, ValueError) as e:
        raise EttinError(f"{source}: a numeric field is not a number ({e})") from None
    try:
        derived = ModelConfig(
            layers=layers,
            hidden=hidden,
            intermediate=inter,
            heads=heads,
            vocab_size=vocab,
            name=_preset_name(layers, hidden, inter, heads),
            causal=causal,
            origin=origin or f"transformers {arch}",
            global_every=global_every,
            local_attention=local,
            rope_theta_global=theta_g,
            rope_theta_local=theta_l,
            attn_out_dropout=dropout,
            **numbers,
            **specials,
        )
    except EttinError as e:
        raise EttinError(f"{source}: {e}") from None
    block = hf.get("ettin")
    if isinstance(block, dict) and block.get("format") == EXPORT_FORMAT and isinstance(block.get("model"), dict):
        try:
            ours = ModelConfig.from_dict(block["model"], source=f"{source} ('ettin' block)")
        except (EttinError, TypeError):
            warn(f"{source}: ignoring an unreadable 'ettin' block; the transformers fields are used")
            return derived
        if _semantics(ours) == _semantics(derived):
            return ours
        warn(f"{source}: the 'ettin' block disagrees with the transformers fields (edited after export?); the transformers fields are used")
        return derived.replace(name=ours.name, objective=ours.objective if ours.causal == causal else derived.objective)
    return derived


# ------------------------------------------------------------------------------------------
# state-dict adapters
# ------------------------------------------------------------------------------------------
def _backbone_map(config: ModelConfig) -> list[tuple[str, str]]:
    """(our key, HF backbone key without the ``model.`` prefix) for every non-attention tensor."""
    pairs = [("embed.weight", "embeddings.tok_embeddings.weight"), ("embed_norm.weight", "embeddings.norm.weight")]
    for i in range(config.layers):
        if i > 0:
            pairs.append((f"blocks.{i}.attn_norm.weight", f"layers.{i}.attn_norm.weight"))
        pairs += [
            (f"blocks.{i}.out.weight", f"layers.{i}.attn.Wo.weight"),
            (f"blocks.{i}.mlp_norm.weight", f"layers.{i}.mlp_norm.weight"),
            (f"blocks.{i}.wi.weight", f"layers.{i}.mlp.Wi.weight"),
            (f"blocks.{i}.wo.weight", f"layers.{i}.mlp.Wo.weight"),
        ]
    pairs.append(("final_norm.weight", "final_norm.weight"))
    return pairs


def _head_prefix(config: ModelConfig) -> str:
    return "lm_head" if config.causal else "head"


def to_hf_state_dict(model_or_state, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (``decoder.weight`` omitted: it is tied to the embedding)."""
    if isinstance(model_or_state, Mapping):
        state = dict(model_or_state)
        if config is None:
            raise TypeError("to_hf_state_dict(state_dict) needs config=")
    else:
        state = model_or_state.state_dict()
        config = config or model_or_state.config
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _backbone_map(config):
        out[f"model.{theirs}"] = state[ours]
    for i in range(config.layers):
        qkv = state[f"blocks.{i}.qkv.weight"]
        if config.causal:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.chunk(3, dim=0)):
                out[f"model.layers.{i}.attn.{name}.weight"] = part.contiguous()
        else:
            out[f"model.layers.{i}.attn.Wqkv.weight"] = qkv
    hp = _head_prefix(config)
    out[f"{hp}.dense.weight"] = state["head_dense.weight"]
    out[f"{hp}.norm.weight"] = state["head_norm.weight"]
    out["decoder.bias"] = state["out_bias"]
    return out


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    take_head: bool = True,
    source: str = "weights",
) -> dict[str, torch.Tensor]:
    """Transformers' ModernBERT tensors -> ours. Head keys are left out when the source has no LM head.

    Accepts keys with or without the ``model.`` prefix (``ModernBertModel`` saves without). An
    output projection that is not the embedding (untied) cannot be represented and is refused.
    """
    backbone: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for k, v in hf_state.items():
        bare = k[len("model."):] if k.startswith("model.") else k
        if bare.startswith(("embeddings.", "layers.", "final_norm.")):
            backbone[bare] = v
        else:
            rest[k] = v
    out: dict[str, torch.Tensor] = {}

    def need(key: str) -> torch.Tensor:
        if key not in backbone:
            raise EttinError(f"{source}: missing tensor 'model.{key}' (have {len(backbone)} backbone tensors; is this the config's model?)")
        return backbone.pop(key)

    for ours, theirs in _backbone_map(config):
        out[ours] = need(theirs)
    for i in range(config.layers):
        if f"layers.{i}.attn.Wqkv.weight" in backbone:
            out[f"blocks.{i}.qkv.weight"] = need(f"layers.{i}.attn.Wqkv.weight")
        else:
            parts = [need(f"layers.{i}.attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
            if len({tuple(t.shape) for t in parts}) != 1:
                raise EttinError(f"{source}: layer {i}: q/k/v projections differ in shape {[tuple(t.shape) for t in parts]}")
            out[f"blocks.{i}.qkv.weight"] = torch.cat(parts, dim=0)
    if backbone:
        extra = sorted(backbone)
        raise EttinError(f"{source}: tensors ettin's architecture has no place for, e.g. {extra[:3]} (biases or a different layout)")
    dec_w = rest.get("decoder.weight")
    if dec_w is not None and not (dec_w.shape == out["embed.weight"].shape and torch.equal(dec_w.to(out["embed.weight"].dtype), out["embed.weight"])):
        raise EttinError(f"{source}: the output projection 'decoder.weight' differs from the token embedding (untied); ettin ties them")
    if take_head:
        hp = _head_prefix(config)
        found = {k: rest.get(f"{hp}.{n}.weight") for k, n in (("head_dense.weight", "dense"), ("head_norm.weight", "norm"))}
        if all(v is not None for v in found.values()):
            out.update(found)
            bias = rest.get("decoder.bias")
            out["out_bias"] = bias if bias is not None else torch.zeros(config.vocab_size, dtype=out["embed.weight"].dtype)
            if any(f"{hp}.{n}.bias" in rest for n in ("dense", "norm")):
                raise EttinError(f"{source}: the prediction head has biases; ettin's has none")
        elif any(v is not None for v in found.values()):
            raise EttinError(f"{source}: incomplete prediction head (need both {hp}.dense.weight and {hp}.norm.weight)")
    return out


def _check_state(state: Mapping[str, torch.Tensor], config: ModelConfig, source: str, *, allow_missing: tuple[str, ...] = ()) -> None:
    """Keys and shapes against a meta-device model of ``config`` (no memory used)."""
    from ettin.checkpoint import check_state_dict
    from ettin.model import Transformer

    with torch.device("meta"):
        want = Transformer(config, init=False).state_dict()
    check_state_dict(state, want, source, allow_missing=allow_missing)


# ------------------------------------------------------------------------------------------
# reading a Hugging Face directory
# ------------------------------------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(hf_dir: str | Path) -> dict:
    """config.json as plain JSON (never through transformers: no auto_map, no remote code)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        hint = " (ettin import/eval/export/convert/embed fetch a Hub id ORG/NAME themselves)" if not hf_dir.is_absolute() and len(hf_dir.parts) == 2 else ""
        raise EttinError(f"{hf_dir}: no such directory{hint}")
    if not hf_dir.is_dir():
        raise EttinError(f"{hf_dir}: not a directory")
    p = hf_dir / "config.json"
    if not p.is_file():
        if (hf_dir / "ettin.json").is_file():
            raise EttinError(f"{hf_dir}: no config.json; this is already an ettin checkpoint (use it directly, or 'ettin export' it)")
        raise EttinError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EttinError(f"{p}: expected a JSON object")
    return data


def _read_tokenizer_json(hf_dir: Path) -> dict | None:
    p = hf_dir / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{p}: invalid JSON ({e})") from None


def _inside(hf_dir: Path, name: str) -> Path:
    """A file named by an index, refusing names that leave the directory."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise EttinError(f"{hf_dir}: weight index names an unsafe file {name!r}")
    return hf_dir / name


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise EttinError(f"{path}: missing weight file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EttinError(f"{path}: unreadable or truncated weights ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise EttinError(f"{path}: missing weight file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input here
        raise EttinError(f"{path}: unreadable weights with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EttinError(f"{path}: not a plain state dict of tensors")
    return state


def _load_index(hf_dir: Path, index: Path, loader) -> dict[str, torch.Tensor]:
    try:
        wm = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise EttinError(f"{index}: invalid weight index ({e})") from None
    if not isinstance(wm, dict) or not wm:
        raise EttinError(f"{index}: no 'weight_map'")
    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(wm.values()), key=str):
        state.update(loader(_inside(hf_dir, name)))
    missing = sorted(set(wm) - set(state))
    if missing:
        raise EttinError(f"{index}: shards lack tensors the index lists, e.g. {missing[:3]}")
    return state


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: safetensors (single or sharded), else a weights-only .bin."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file():
        return _load_safetensors(hf_dir / "model.safetensors")
    if (hf_dir / "model.safetensors.index.json").is_file():
        return _load_index(hf_dir, hf_dir / "model.safetensors.index.json", _load_safetensors)
    if (hf_dir / "pytorch_model.bin").is_file():
        return _load_bin(hf_dir / "pytorch_model.bin")
    if (hf_dir / "pytorch_model.bin.index.json").is_file():
        return _load_index(hf_dir, hf_dir / "pytorch_model.bin.index.json", _load_bin)
    raise EttinError(f"{hf_dir}: no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _has_lm_head(causal: bool, arch: str, hf_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the source's prediction head is a language-modelling head (not e.g. a classifier's)."""
    if causal:
        return arch in ("", DECODER_ARCH) and "lm_head.dense.weight" in hf_state
    return (arch == ENCODER_ARCH or "decoder.bias" in hf_state) and "head.dense.weight" in hf_state


def load_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """(config, our state dict in fp32, notes) from a local transformers ModernBERT directory.

    The state dict lacks the head keys when the source has no LM head; ``notes`` says why.
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    src = str(hf_dir / "config.json")
    causal, arch = model_kind(hf, src)
    tok = _read_tokenizer_json(hf_dir)
    config = config_from_hf(hf, source=src, tokenizer_json=tok, origin=f"hf:{hf_dir.resolve()} ({arch})")
    hf_state = read_hf_weights(hf_dir)
    take_head = _has_lm_head(causal, arch, hf_state)
    state = from_hf_state_dict(hf_state, config, take_head=take_head, source=str(hf_dir))
    state = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    from ettin.checkpoint import check_finite

    check_finite(state, hf_dir)
    notes = []
    if not all(k in state for k in HEAD_KEYS):
        notes.append(f"{hf_dir}: {arch or 'the model'} has no language-modelling head; the head (dense, norm, output bias) is initialised randomly")
    _check_state(state, config, str(hf_dir), allow_missing=HEAD_KEYS)
    if tok is not None:
        top = max_token_id(tok)
        if top is not None and top >= config.vocab_size:
            notes.append(f"{hf_dir}: the tokenizer produces ids up to {top} but the model's vocabulary has {config.vocab_size} "
                         f"(ids {config.vocab_size}..{top} would fall outside the embedding)")
    return config, state, notes


def max_token_id(tokenizer_json: dict) -> int | None:
    """The largest id a tokenizer.json can produce: its model's vocabulary and its added tokens
    (which mostly repeat vocabulary entries, so counting both would overstate the size)."""
    ids: list[int] = []
    vocab = (tokenizer_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids.extend(v for v in vocab.values() if isinstance(v, int))
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        if vocab:
            ids.append(len(vocab) - 1)
    for t in tokenizer_json.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int):
            ids.append(t["id"])
    return max(ids) if ids else None


def _build(config: ModelConfig, state: dict[str, torch.Tensor]):
    """A Transformer holding ``state``; a missing head is initialised (seeded, so imports repeat)."""
    from ettin.model import Transformer

    if all(k in state for k in HEAD_KEYS):
        with torch.device("meta"):
            model = Transformer(config, init=False)
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        return model.eval()  # inference mode: no attention-output dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Transformer(config)
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= set(HEAD_KEYS) and not result.unexpected_keys, result
    return model.eval()


def load_hf_as_model(hf_dir: str | Path):
    """In-memory import (no files written): a :class:`ettin.model.Transformer` for evaluation."""
    config, state, notes = load_hf(hf_dir)
    for n in notes:
        warn(n)
    return _build(config, state)


def import_hf(hf_dir: str | Path, out_ckpt: str | Path, *, force: bool = False) -> Path:
    """Write an ettin checkpoint from a local transformers ModernBERT directory (atomically)."""
    from ettin.checkpoint import is_checkpoint, save_checkpoint

    from ettin.resolve import resolve_model

    out_ckpt = Path(out_ckpt)
    r = resolve_model(hf_dir)  # a local transformers directory or a Hub id (fetched into the HF cache)
    if r.kind != "hf":
        what = {"checkpoint": "an ettin checkpoint", "run": "an ettin run directory", "pair": "an ettin pair run"}.get(r.kind, "a directory of ettin runs")
        raise EttinError(f"{hf_dir}: already {what}, nothing to import (use it directly, or 'ettin export' it to get a Hugging Face directory)")
    hf_dir = r.path
    _check_out(out_ckpt, hf_dir, force=force, ours=is_checkpoint(out_ckpt))
    config, state, notes = load_hf(hf_dir)
    for n in notes:
        warn(n)
    model = _build(config, state)
    hf = read_hf_config(hf_dir)
    block = hf.get("ettin") if isinstance(hf.get("ettin"), dict) else {}
    meta = {"step": 0, "tokens": 0, "imported_from": r.hub_id or str(hf_dir.resolve()), "hf_architecture": model_kind(hf)[1]}
    if isinstance(block.get("meta"), dict) and block["meta"]:
        meta["source_meta"] = block["meta"]
    if any("initialised randomly" in n for n in notes):
        meta["random_head"] = True

    def copy_tok(tmp: Path) -> None:
        if (hf_dir / "tokenizer.json").is_file():
            copy_tokenizer_files(hf_dir, tmp / "tokenizer")

    save_checkpoint(out_ckpt, model, meta=meta, extra_writer=copy_tok)
    return out_ckpt


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Only tokenizer files (a model directory also holds config.json, weight indexes, ...)."""
    from ettin.safety import copy_small_files

    copy_small_files(src, dst, names=set(TOKENIZER_FILES))  # a symlink out of the model directory is refused


# ------------------------------------------------------------------------------------------
# writing a Hugging Face directory
# ------------------------------------------------------------------------------------------
def _check_out(out: Path, src: Path, *, force: bool, ours: bool) -> None:
    """Refuse to replace the source, a file, a training run, or (without --force) a non-empty
    directory that is not an earlier output of ours."""
    from ettin.safety import check_out

    check_out(out, force=force, ours=ours, what="output directory", inputs=(src,))


def _is_export(path: Path) -> bool:
    try:
        return (json.loads((path / "config.json").read_text()).get("ettin") or {}).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _hf_tokenizer(tok_dir: Path, config: ModelConfig):
    """A PreTrainedTokenizerFast with every special token named, so AutoTokenizer works offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = tok_dir / "tokenizer.json"
    try:
        raw = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise EttinError(f"{path}: unreadable tokenizer ({e})") from None

    def tok(i: int, name: str) -> str:
        t = raw.id_to_token(i)
        if t is None:
            raise EttinError(f"{path}: the model's {name} id {i} is not in the tokenizer")
        return t

    cls_t, sep_t, pad_t, mask_t = (tok(i, n) for i, n in zip(config.special_ids, ("CLS", "SEP", "PAD", "MASK")))
    unk = None
    try:
        unk = json.loads(path.read_text()).get("model", {}).get("unk_token")
    except (ValueError, AttributeError):
        pass
    if unk is None and raw.token_to_id("[UNK]") is not None:
        unk = "[UNK]"
    kwargs = dict(cls_token=cls_t, sep_token=sep_t, pad_token=pad_t, mask_token=mask_t, bos_token=cls_t, eos_token=sep_t)
    if unk is not None:
        kwargs["unk_token"] = unk
    if config.causal:
        # A decoder reads "[CLS] text" and generates on: no trailing [SEP] from the tokenizer, or
        # lm-evaluation-harness (context/continuation split by length) would score the wrong tokens.
        kwargs.update(add_bos_token=True, add_eos_token=False)
    # ModernBERT takes no token_type_ids: name the inputs so tokenizer(...) output can be fed as **kwargs.
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), model_max_length=config.max_seq_len, model_input_names=["input_ids", "attention_mask"], **kwargs
    )


def _readme(config: ModelConfig, meta: dict, has_tokenizer: bool) -> str:
    kind = config.kind
    arch = DECODER_ARCH if config.causal else ENCODER_ARCH
    auto = "AutoModelForCausalLM" if config.causal else "AutoModelForMaskedLM"
    lines = [
        f"# ettin {kind} ({config.name}) exported to Hugging Face transformers",
        "",
        f"- kind: **{kind}** (`{arch}`), {config.num_params():,} parameters, {config.layers} layers, hidden {config.hidden}",
        f"- objective: **{config.objective}**",
        f"- origin: {config.origin}",
        *([f"- training position: step {meta['step']}, {meta.get('tokens', 0):,} tokens seen"] if isinstance(meta.get("step"), int) else []),
        f"- attention: global every {config.global_every} layers, local window (left, right) = {config.window()}; "
        f"RoPE theta global {config.rope_theta_global:g}, local {config.rope_theta_local:g}",
        f"- special ids: CLS {config.cls_id}, SEP {config.sep_id}, PAD {config.pad_id}, MASK {config.mask_id}",
        "",
    ]
    if config.objective == "mntp":
        lines += [
            "**Note: trained with MNTP (masked next-token prediction).** The MLM head is shifted by one: "
            "the token at position i is predicted from the output at position i-1. To fill a mask at i, "
            "read the logits at i-1.",
            "",
        ]
    lines += [
        "```python",
        f"from transformers import AutoTokenizer, {auto}",
        f'model = {auto}.from_pretrained("PATH")' + ("" if has_tokenizer else "  # no tokenizer was stored with this checkpoint"),
    ]
    if has_tokenizer:
        lines.append('tokenizer = AutoTokenizer.from_pretrained("PATH")')
    lines += ["```", ""]
    if not config.causal:
        lines += ["The directory also holds sentence-transformers files (mean pooling): `SentenceTransformer(\"PATH\")`"
                  + ("." if has_tokenizer else " (needs a tokenizer, which this export lacks)."), ""]
    else:
        lines += ["Works with `lm_eval --model hf --model_args pretrained=PATH`.", ""]
    lines += ["Written by `ettin export`; `ettin import PATH --out CKPT` reads it back exactly (our config is kept under `\"ettin\"` in config.json).", ""]
    return "\n".join(lines)


def _write_sentence_transformers(tmp: Path, config: ModelConfig) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": config.hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": config.max_seq_len, "do_lower_case": False}, indent=2) + "\n")
    (tmp / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2) + "\n")
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")


def _hf_model(config: ModelConfig, hf_state: dict[str, torch.Tensor], meta: dict, source: str):
    """The transformers model holding ``hf_state`` (built on the meta device: no init, no copy)."""
    from transformers import ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    hf_cfg = hf_config_for(config, meta=meta, source=source)
    cls = ModernBertDecoderForCausalLM if config.causal else ModernBertForMaskedLM
    dtype = next(iter(hf_state.values())).dtype
    with torch.device("meta"):
        model = cls(hf_cfg)
    res = model.load_state_dict(hf_state, strict=False, assign=True)
    if set(res.missing_keys) != {"decoder.weight"} or res.unexpected_keys:  # pragma: no cover - a mapping bug
        raise RuntimeError(f"HF key mapping out of date: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    model.decoder.weight = model.get_input_embeddings().weight
    model.config.dtype = dtype
    return model


def _patch_json(path: Path, **changes) -> None:
    if path.is_file():
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _add_legacy_keys(path: Path, config: ModelConfig) -> None:
    """The transformers 4.x names too, so older readers (4.48+) get the same thetas, not their defaults.

    5.x reads ``rope_parameters`` first and ignores these; tokenizer_class likewise becomes the name
    both generations know (5.x writes its new ``TokenizersBackend``).
    """
    _patch_json(path, global_rope_theta=float(config.rope_theta_global), local_rope_theta=float(config.rope_theta_local))


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``ckpt_dir`` as a transformers directory (+ tokenizer, README, sentence-transformers files)."""
    from ettin.checkpoint import load_config, load_state_dict, read_meta, tokenizer_dir
    from ettin.fsutil import atomic_dir
    from transformers.utils import logging as hf_logging

    from ettin.progress import progress
    from ettin.resolve import single_model

    out_dir = Path(out_dir)
    r = single_model(ckpt_dir, "export")  # a run: its last checkpoint; a pair: which side?
    if r.kind == "hf":  # a transformers directory or Hub id: through our format (README, sentence-transformers files)
        import tempfile

        _check_out(out_dir, r.path, force=force, ours=_is_export(out_dir))
        with tempfile.TemporaryDirectory(prefix="ettin-export-") as td:
            return export_checkpoint(import_hf(r.path, Path(td) / "ckpt"), out_dir, force=force)
    ckpt_dir = r.path
    meta = read_meta(ckpt_dir).get("meta") or {}
    config = load_config(ckpt_dir)
    _check_out(out_dir, ckpt_dir, force=force, ours=_is_export(out_dir))
    hf_config_dict(config, source=str(ckpt_dir))  # refuse an inexpressible window before reading weights
    with progress(3, f"export {ckpt_dir.name}", "steps", leave=False) as bar:
        bar.update(doing="reading weights")
        state = load_state_dict(ckpt_dir)
        _check_state(state, config, str(ckpt_dir))
        from ettin.checkpoint import check_finite

        check_finite(state, ckpt_dir)
        tok_dir = tokenizer_dir(ckpt_dir)
        tokenizer = _hf_tokenizer(tok_dir, config) if tok_dir is not None else None
        bar.advance(1, doing="building the transformers model")
        model = _hf_model(config, to_hf_state_dict(state, config), meta, str(ckpt_dir))
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one line per command, not a progress bar per shard
        try:
            bar.advance(1, doing=f"writing {out_dir}")
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                _add_legacy_keys(tmp / "config.json", config)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                    _patch_json(tmp / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
                if not config.causal:
                    _write_sentence_transformers(tmp, config)
                (tmp / "README.md").write_text(_readme(config, meta, tokenizer is not None))
            bar.advance(1, doing="done")
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return out_dir
