"""Tokenizers: train our byte-level BPE, or accept any directory with a ``tokenizer.json``.

Tokenizers we train put ``[CLS] [SEP] [PAD] [MASK] [UNK]`` at ids 0..4 (CLS doubles as BOS,
SEP as EOS; ``[UNK]`` exists only for Hugging Face compatibility, byte-level BPE never needs
it). The vocabulary the *model* gets is the tokenizer's real vocabulary rounded up to a
multiple of 64; both numbers are recorded in ``ettin_tokenizer.json``::

    DIR/tokenizer.json          Hugging Face ``tokenizers`` file (the tokenizer itself)
    DIR/ettin_tokenizer.json    {"format": "ettin-tokenizer", "version": 1, "vocab_size": <padded>,
                                 "real_vocab_size": n, "cls_id": 0, "sep_id": 1, "pad_id": 2,
                                 "mask_id": 3, "cls_token": "[CLS]", ...}
    DIR/tokenizer_config.json   for ``transformers.AutoTokenizer`` (PreTrainedTokenizerFast)

A foreign directory (e.g. a local copy of ModernBERT's tokenizer) has no ``ettin_tokenizer.json``:
its special tokens are found through ``tokenizer_config.json`` / ``special_tokens_map.json`` or by
their usual names (``[CLS]``/``<s>``, ``[SEP]``/``</s>``, ``[PAD]``/``<pad>``, ``[MASK]``/``<mask>``).

Every document is encoded as ``[CLS] text [SEP]`` (see :func:`encode_document`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ettin.errors import EttinError

TOKENIZER_FILE = "tokenizer.json"
ETTIN_FILE = "ettin_tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
FORMAT = "ettin-tokenizer"
VERSION = 1
PAD_MULTIPLE = 64

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
ROLES = ("cls", "sep", "pad", "mask")
# Names tried, in order, for a foreign tokenizer without ettin_tokenizer.json.
_CANDIDATES = {
    "cls": ("[CLS]", "<s>", "<cls>", "<bos>", "<|begin_of_text|>"),
    "sep": ("[SEP]", "</s>", "<sep>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("[PAD]", "<pad>", "<|padding|>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
}
# tokenizer_config.json keys per role (the second is a fallback: BOS for CLS, EOS for SEP).
_HF_KEYS = {"cls": ("cls_token", "bos_token"), "sep": ("sep_token", "eos_token"), "pad": ("pad_token",), "mask": ("mask_token",)}


def padded_vocab_size(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-int(n) // multiple) * multiple


# -- locating and loading --------------------------------------------------------------------


def resolve_dir(path: str | os.PathLike) -> Path:
    """The tokenizer directory ``path`` names (a directory with tokenizer.json, or the file itself)."""
    p = Path(path)
    if p.is_file() and p.name == TOKENIZER_FILE:
        p = p.parent
    if not p.exists():
        raise EttinError(f"{p}: tokenizer directory not found")
    if not p.is_dir():
        raise EttinError(f"{p}: expected a tokenizer directory containing {TOKENIZER_FILE}")
    if not (p / TOKENIZER_FILE).is_file():
        # A checkpoint or prepared data directory carries its tokenizer in tokenizer/.
        if (p / "tokenizer" / TOKENIZER_FILE).is_file():
            return p / "tokenizer"
        raise EttinError(f"{p}: no {TOKENIZER_FILE} in this directory (expected a tokenizer directory)")
    return p


def _stamp(d: Path) -> tuple:
    out = []
    for name in (TOKENIZER_FILE, ETTIN_FILE, HF_CONFIG_FILE, "special_tokens_map.json"):
        try:
            st = (d / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((name, None, None))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _load(dirname: str, stamp: tuple):
    from tokenizers import Tokenizer

    path = Path(dirname) / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EttinError(f"{path}: not a valid tokenizers file ({msg})") from None


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of a tokenizer directory (cached; do not mutate it)."""
    d = resolve_dir(path)
    return _load(str(d.resolve()), _stamp(d))


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise EttinError(f"{path}: expected a JSON object")
    return obj


def _token_name(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


@functools.lru_cache(maxsize=16)
def _info(dirname: str, stamp: tuple) -> dict:
    d = Path(dirname)
    tok = _load(dirname, stamp)
    real = _real_size(tok)
    meta = _read_json(d / ETTIN_FILE)
    if meta is not None:
        from ettin.validate import MAX_VOCAB

        if not isinstance(meta, dict):
            raise EttinError(f"{d / ETTIN_FILE}: expected a JSON object")

        def int_key(key: str, hi: int) -> int:
            v = meta.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise EttinError(f"{d / ETTIN_FILE}: '{key}' must be an integer in [0, {hi:,}], got {v!r}")
            return v

        padded = int_key("vocab_size", MAX_VOCAB)
        ids = {f"{r}_id": int_key(f"{r}_id", MAX_VOCAB) for r in ROLES}
        names = {f"{r}_token": str(meta.get(f"{r}_token", "")) for r in ROLES}
        for r in ROLES:
            name = names[f"{r}_token"]
            if name and tok.token_to_id(name) != ids[f"{r}_id"]:
                raise EttinError(f"{d / ETTIN_FILE}: {r}_id={ids[f'{r}_id']} but {TOKENIZER_FILE} maps '{name}' to {tok.token_to_id(name)}")
        if padded < real or padded % PAD_MULTIPLE:
            raise EttinError(f"{d / ETTIN_FILE}: vocab_size {padded} must be a multiple of {PAD_MULTIPLE} and >= the real vocabulary ({real})")
    else:
        hf = {}
        for fname in ("special_tokens_map.json", HF_CONFIG_FILE):
            obj = _read_json(d / fname)
            if obj:
                hf.update({k: v for k, v in obj.items() if k.endswith("_token")})
        ids, names = {}, {}
        for r in ROLES:
            tried = []
            found = None
            for key in _HF_KEYS[r]:
                name = _token_name(hf.get(key))
                if name is not None:
                    tried.append(name)
                    if tok.token_to_id(name) is not None:
                        found = name
                        break
            if found is None:
                for name in _CANDIDATES[r]:
                    tried.append(name)
                    if tok.token_to_id(name) is not None:
                        found = name
                        break
            if found is None:
                raise EttinError(f"{d}: tokenizer has no {r.upper()} token (looked for {', '.join(dict.fromkeys(tried))}); add it or write {ETTIN_FILE}")
            ids[f"{r}_id"] = tok.token_to_id(found)
            names[f"{r}_token"] = found
        padded = padded_vocab_size(max(real, max(ids.values()) + 1))
    if len(set(ids.values())) != len(ids):
        raise EttinError(f"{d}: special tokens must have distinct ids, got {ids}")
    for k, v in ids.items():
        if not 0 <= v < padded:
            raise EttinError(f"{d}: {k}={v} lies outside the vocabulary of {padded}")
    return {"vocab_size": padded, "real_vocab_size": real, **ids, **names}


def _real_size(tok) -> int:
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab:
        n = max(n, max(vocab.values()) + 1)
    return n


def tokenizer_info(path: str | os.PathLike) -> dict:
    """vocab_size (padded), real_vocab_size, the four special ids and token names, hash, dtype."""
    d = resolve_dir(path)
    info = dict(_info(str(d.resolve()), _stamp(d)))
    info["hash"] = tokenizer_hash(d)
    info["dtype"] = token_dtype(info["vocab_size"])
    info["path"] = str(d)
    return info


def special_ids(path: str | os.PathLike) -> dict:
    """``{"cls_id", "sep_id", "pad_id", "mask_id"}`` of a tokenizer directory."""
    d = resolve_dir(path)
    info = _info(str(d.resolve()), _stamp(d))
    return {f"{r}_id": info[f"{r}_id"] for r in ROLES}


def real_vocab_size(path: str | os.PathLike) -> int:
    d = resolve_dir(path)
    return _info(str(d.resolve()), _stamp(d))["real_vocab_size"]


def model_overrides(path: str | os.PathLike) -> dict:
    """ModelConfig fields a tokenizer decides: padded ``vocab_size`` and the special ids."""
    d = resolve_dir(path)
    info = _info(str(d.resolve()), _stamp(d))
    return {"vocab_size": info["vocab_size"], **{f"{r}_id": info[f"{r}_id"] for r in ROLES}}


def token_dtype(vocab_size: int) -> str:
    """Storage dtype of token shards: uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@functools.lru_cache(maxsize=16)
def _hash(dirname: str, stamp: tuple) -> str:
    d = Path(dirname)
    try:
        canon = json.loads((d / TOKENIZER_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EttinError(f"{d / TOKENIZER_FILE}: invalid JSON ({e})") from None
    info = _info(dirname, stamp)
    h = hashlib.sha256()
    h.update(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps({k: info[k] for k in ("vocab_size", "cls_id", "sep_id", "pad_id", "mask_id")}, sort_keys=True).encode())
    return h.hexdigest()


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 over tokenizer.json (canonical JSON, so formatting does not matter), the special ids
    and the padded vocabulary size: equal hashes mean identical token ids for any text."""
    d = resolve_dir(path)
    return _hash(str(d.resolve()), _stamp(d))


def check_model_compat(path: str | os.PathLike, config, *, what: str = "model") -> None:
    """Raise EttinError unless the tokenizer fits ``config`` (a ModelConfig): every token id lies
    inside the model's vocabulary and the special ids agree."""
    d = resolve_dir(path)
    info = _info(str(d.resolve()), _stamp(d))
    if info["real_vocab_size"] > config.vocab_size:
        raise EttinError(f"{d}: tokenizer has {info['real_vocab_size']} tokens but the {what} vocabulary is {config.vocab_size}")
    for r in ROLES:
        k = f"{r}_id"
        if info[k] != getattr(config, k):
            raise EttinError(f"{d}: tokenizer {k}={info[k]} but the {what} has {k}={getattr(config, k)}")


def encode_document(tok, text: str, cls_id: int, sep_id: int) -> list[int]:
    """The token ids of one document: ``[CLS] text [SEP]`` (the contract prepare follows)."""
    return [cls_id, *tok.encode(text, add_special_tokens=False).ids, sep_id]


# -- training --------------------------------------------------------------------------------


def new_bpe_tokenizer():
    """An untrained byte-level BPE tokenizer laid out as ours are (specials added by training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 0), ("[SEP]", 1)],
    )
    return tok


def train_tokenizer(
    texts: Iterable[str],
    out: str | os.PathLike,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
    sources: list[str] | None = None,
) -> dict:
    """Train byte-level BPE on ``texts`` and write the tokenizer directory atomically."""
    from tokenizers import pre_tokenizers, trainers

    from ettin.fsutil import atomic_dir

    minimum = len(SPECIAL_TOKENS) + 256 + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise EttinError(f"--vocab-size must be at least {minimum} (5 specials + 256 bytes + 1 merge), got {vocab_size}")
    if vocab_size > 1 << 20:
        raise EttinError(f"--vocab-size {vocab_size} is unreasonably large (max {1 << 20})")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    counter = {"docs": 0}

    def counted():
        for t in texts:
            counter["docs"] += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer, length=length)
    if counter["docs"] == 0:
        raise EttinError("tokenizer train: the inputs contain no documents")
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:  # guaranteed by BpeTrainer; checked because everything relies on it
            raise EttinError(f"internal: special token {name} got id {tok.token_to_id(name)}, expected {i}")
    real = _real_size(tok)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "type": "byte-level-bpe",
        "vocab_size": padded_vocab_size(real),
        "real_vocab_size": real,
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "documents": counter["docs"],
        "trained_on": list(sources or []),
        **{f"{r}_token": SPECIAL_TOKENS[i] for i, r in enumerate(ROLES)},
        **{f"{r}_id": i for i, r in enumerate(ROLES)},
        "unk_token": "[UNK]",
        "unk_id": 4,
        "bos": "cls",
        "eos": "sep",
    }
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
        "bos_token": "[CLS]",
        "eos_token": "[SEP]",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE))
        (tmp / ETTIN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return tokenizer_info(out)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a tokenizer directory's small files (json/txt/model) into ``dst``."""
    from ettin.safety import copy_small_files

    copy_small_files(resolve_dir(src), Path(dst))  # a symlink out of the tokenizer directory is refused
