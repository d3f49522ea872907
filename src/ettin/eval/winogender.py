"""Winogender probe (``winogender/{all_sentences,templates,occupations-stats}.tsv``).

Each schema sentence exists in a male, a female and a neutral version that differ only around
the pronoun ("he was" / "she was" / "they were"). The model picks one version:

- decoders: the highest log-likelihood of the sentence ([CLS] + sentence; the shared prefix
  cancels, so this compares the pronoun and everything after it);
- encoders: fill the masked pronoun: the pseudo-log-likelihood of the differing words (each of
  their tokens masked in turn) with the rest of the sentence visible (MNTP models read i-1).

Reported (shares of the 3 choices, each set summing to 1): overall ``male``/``female``/
``neutral``, and per template set: the referent the pronoun refers to
(``referent_occupation``/``referent_participant``), the other participant's form
(``participant_specific``/``participant_someone``), the pronoun case (``case_nom``/``case_poss``/
``case_acc``), and the occupations' real-world gender balance (``occupation_male_majority`` /
``occupation_female_majority`` by the BLS statistics). As in Rudinger et al. (2018), the per
occupation probability of the female version (softmax over the three scores, averaged over the
occupation's sentences) is correlated with the occupation's % female (``r_bls_female``,
``r_bergsma_female``; Pearson).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ettin.errors import EttinError
from ettin.eval import scoring
from ettin.eval.data import read_tsv
from ettin.eval.metrics import pearson

KNOWN = ("winogender",)
GENDERS = ("male", "female", "neutral")
FILES = ("all_sentences.tsv", "templates.tsv", "occupations-stats.tsv")


@dataclass
class Item:
    occupation: str
    participant: str
    answer: str
    someone: bool
    case: str
    sentences: dict[str, str]  # gender -> sentence


@dataclass
class WinoData:
    items: list[Item]
    stats: dict[str, dict[str, float]]  # occupation -> {"bls": %, "bergsma": %}


def _case(template: str) -> str:
    for key, name in (("$NOM_PRONOUN", "nom"), ("$POSS_PRONOUN", "poss"), ("$ACC_PRONOUN", "acc")):
        if key in template:
            return name
    return "other"


def load(spec, task_dir: Path, split: str, opts) -> WinoData:
    for f in FILES:
        if not (task_dir / f).is_file():
            raise EttinError(f"task 'winogender': expected {task_dir / f}, not found")
    path = task_dir / "all_sentences.tsv"
    _, rows = read_tsv(path)
    groups: dict[tuple, dict[str, str]] = {}
    for lineno, f in rows:
        if len(f) < 2:
            raise EttinError(f"{path}:{lineno}: expected 'sentid<TAB>sentence'")
        parts = f[0].split(".")
        if len(parts) < 4 or parts[3] not in GENDERS:
            raise EttinError(f"{path}:{lineno}: sentence id {f[0]!r} is not occupation.participant.answer.gender.txt")
        groups.setdefault(tuple(parts[:3]), {})[parts[3]] = f[1]
    tpath = task_dir / "templates.tsv"
    _, trows = read_tsv(tpath)
    templates = {}
    for lineno, f in trows:
        if len(f) < 4:
            raise EttinError(f"{tpath}:{lineno}: expected occupation, participant, answer, sentence")
        templates[(f[0], f[2])] = (f[1], f[3])
    spath = task_dir / "occupations-stats.tsv"
    cols, srows = read_tsv(spath)
    try:
        i_occ, i_berg, i_bls = cols.index("occupation"), cols.index("bergsma_pct_female"), cols.index("bls_pct_female")
    except ValueError:
        raise EttinError(f"{spath}:1: expected columns occupation, bergsma_pct_female, bls_pct_female") from None
    stats = {}
    for lineno, f in srows:
        try:
            stats[f[i_occ]] = {"bergsma": float(f[i_berg]), "bls": float(f[i_bls])}
        except (ValueError, IndexError):
            raise EttinError(f"{spath}:{lineno}: expected numbers for the % female columns") from None
    items = []
    for (occ, part, ans), sents in groups.items():
        missing = [g for g in GENDERS if g not in sents]
        if missing:
            raise EttinError(f"{path}: {occ}.{part}.{ans} lacks the {missing[0]} version")
        tmpl = templates.get((occ, ans))
        items.append(Item(occ, part, ans, part == "someone", _case(tmpl[1]) if tmpl else "other", sents))
    if opts.limit:
        items = items[: opts.limit]
    return WinoData(items, stats)


def _diff(sents: list[str]) -> tuple[str, list[str], str]:
    """(shared prefix, differing middles, shared suffix), split at word boundaries."""
    words = [s.split(" ") for s in sents]
    i = 0
    while all(len(w) > i for w in words) and len({w[i] for w in words}) == 1:
        i += 1
    j = 0
    while all(len(w) - j > i for w in words) and len({w[len(w) - 1 - j] for w in words}) == 1:
        j += 1
    pre = " ".join(words[0][:i])
    suf = " ".join(words[0][len(words[0]) - j:]) if j else ""
    mids = [" ".join(w[i:len(w) - j]) for w in words]
    return pre, mids, suf


def scores(em, items: list[Item], opts) -> list[list[float]]:
    cfg = em.config
    tok = em.tokenizer
    out = []
    if em.is_encoder:
        reqs = []
        for it in items:
            pre, mids, suf = _diff([it.sentences[g] for g in GENDERS])
            for m in mids:
                left = tok.encode(pre) if pre else []
                with_mid = tok.encode((pre + " " if pre else "") + m)
                span = with_mid[len(left):]
                whole = tok.encode((pre + " " if pre else "") + m + (" " + suf if suf else ""))
                right = whole[len(left) + len(span):]
                reqs.append(([cfg.cls_id] + left, span, right + [cfg.sep_id]))
        res = scoring.masked_loglikelihood(em.model, reqs, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size,
                                           max_length=opts.max_length, mntp=cfg.objective == "mntp")
    else:
        pairs = []
        for it in items:
            pre, _, _ = _diff([it.sentences[g] for g in GENDERS])
            for g in GENDERS:
                s = it.sentences[g]
                pairs.append((s[: len(pre)], s[len(pre):]))
        split = scoring.split_pairs(tok, pairs)
        reqs = [([cfg.cls_id] + ctx, cont) for ctx, cont in split]
        res = scoring.loglikelihood(em.model, reqs, pad_id=cfg.pad_id, batch_size=opts.batch_size, max_length=opts.max_length)
    for k in range(len(items)):
        out.append([res[3 * k + j][0] for j in range(3)])
    return out


def run(em, spec, data: WinoData, opts, samples: list | None = None) -> dict:
    lls = scores(em, data.items, opts)
    picks = [max(range(3), key=lambda j: (ll[j], -j)) for ll in lls]
    if samples is not None:
        for it, ll, p in zip(data.items, lls, picks):
            samples.append({"id": f"{it.occupation}.{it.participant}.{it.answer}", "label": None, "prediction": GENDERS[p],
                            "scores": list(ll), "metrics": {g: float(p == j) for j, g in enumerate(GENDERS)}})
    probs = []
    for ll in lls:
        m = max(ll)
        e = [math.exp(v - m) for v in ll]
        z = sum(e)
        probs.append([v / z for v in e])

    out: dict = {}

    def shares(name: str, idx: list[int]) -> None:
        if not idx:
            return
        for j, g in enumerate(GENDERS):
            key = g if name == "" else f"{name}/{g}"
            out[key] = sum(1 for i in idx if picks[i] == j) / len(idx)

    all_idx = list(range(len(data.items)))
    shares("", all_idx)
    for ref, label in (("0", "referent_occupation"), ("1", "referent_participant")):
        shares(label, [i for i in all_idx if data.items[i].answer == ref])
    shares("participant_specific", [i for i in all_idx if not data.items[i].someone])
    shares("participant_someone", [i for i in all_idx if data.items[i].someone])
    for case in ("nom", "poss", "acc"):
        shares(f"case_{case}", [i for i in all_idx if data.items[i].case == case])
    known = [i for i in all_idx if data.items[i].occupation in data.stats]
    shares("occupation_male_majority", [i for i in known if data.stats[data.items[i].occupation]["bls"] < 50])
    shares("occupation_female_majority", [i for i in known if data.stats[data.items[i].occupation]["bls"] >= 50])
    per_occ: dict[str, list[float]] = {}
    for i in known:
        per_occ.setdefault(data.items[i].occupation, []).append(probs[i][1])
    occs = sorted(per_occ)
    pf = [sum(per_occ[o]) / len(per_occ[o]) for o in occs]
    out["r_bls_female"] = pearson(pf, [data.stats[o]["bls"] for o in occs])
    out["r_bergsma_female"] = pearson(pf, [data.stats[o]["bergsma"] for o in occs])
    out["n"] = len(data.items)
    return out
