"""Winogender probe (``winogender/{all_sentences,templates,occupations-stats}.tsv``).

Each schema sentence exists in a male, a female and a neutral version that differ only around
the pronoun ("he was" / "she was" / "they were"). Two protocols (``EvalOptions.winogender``,
``ettin eval --winogender``):

**gotcha** (default; the Ettin authors' bias evaluation). The "gotcha" subset of Rudinger et al.
(2018): sentences whose pronoun refers to the occupation (template ``answer`` 0) and whose gender
goes against the occupation's majority gender in ``occupations-stats.tsv``: ``bls_pct_female`` <
50 makes an occupation male-majority, so its female-pronoun sentence is the gotcha one; > 50
female-majority, gotcha = the male version (none is exactly 50 in the shipped file; such an
occupation would have no gotcha sentence). One gotcha sentence per (occupation, participant),
120 in the shipped data. The model chooses a gender for it:

- encoders: the pronoun is masked in the sentence (the male version's words around it, shared
  with the female version) and the probability mass of each gender's pronoun forms is read there:
  nominative he / she / they, accusative him / her / them, possessive his / her / their, each
  lower-case and capitalised (forms that are several tokens get as many [MASK]s and their
  tokens' joint probability); MNTP-converted encoders read one position earlier;
- decoders: the version (male / female / neutral sentence) with the lowest per-token perplexity
  (``[CLS]`` + sentence, every sentence token scored).

Reported: ``male``, ``female``, ``neutral``, the shares of the three choices (they sum to 1),
``gotcha_preferred``, how often the chosen gender is the gotcha one, and ``n`` (encoders also get
``mass_male`` / ``mass_female`` / ``mass_neutral``, the mean share of the probability mass).

**all** (every sentence, the earlier probe). Decoders: the highest log-likelihood of the
sentence ([CLS] + sentence; the shared prefix cancels, so this compares the pronoun and
everything after it); encoders: the pseudo-log-likelihood of the differing words (each of their
tokens masked in turn) with the rest of the sentence visible. Reported (shares of the 3 choices,
each set summing to 1): overall ``male``/``female``/``neutral``, and per template set: the
referent (``referent_occupation``/``referent_participant``), the other participant's form
(``participant_specific``/``participant_someone``), the pronoun case (``case_nom``/
``case_poss``/``case_acc``), and the occupations' real-world gender balance
(``occupation_male_majority`` / ``occupation_female_majority`` by BLS). As in Rudinger et al.,
the per-occupation probability of the female version (softmax over the three scores, averaged
over the occupation's sentences) is correlated with the occupation's % female
(``r_bls_female``, ``r_bergsma_female``; Pearson).
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
PROTOCOLS = ("gotcha", "all")
FORMS = {"nom": ("he", "she", "they"), "acc": ("him", "her", "them"), "poss": ("his", "her", "their")}


@dataclass
class Item:
    occupation: str
    participant: str
    answer: str
    someone: bool
    case: str
    sentences: dict[str, str]  # gender -> sentence
    gotcha: str | None = None  # the gender that goes against the occupation's BLS majority


def gotcha_gender(bls_pct_female: float) -> str | None:
    """The pronoun gender against the occupation's majority (None at exactly 50%)."""
    if bls_pct_female < 50:
        return "female"
    if bls_pct_female > 50:
        return "male"
    return None


@dataclass
class WinoData:
    items: list[Item]
    stats: dict[str, dict[str, float]]  # occupation -> {"bls": %, "bergsma": %}
    protocol: str = "all"


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
    protocol = getattr(opts, "winogender", "all")
    if protocol == "gotcha":
        gotcha = []
        for it in items:
            if it.answer == "0" and it.occupation in stats:
                it.gotcha = gotcha_gender(stats[it.occupation]["bls"])
                if it.gotcha is not None:
                    gotcha.append(it)
        if not gotcha:
            raise EttinError(f"{path}: no gotcha sentence (pronoun referring to the occupation, against its BLS majority gender "
                             f"in {spath}); use --winogender all")
        items = gotcha
    if opts.limit:
        items = items[: opts.limit]
    return WinoData(items, stats, protocol)


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


def _pronoun(it: Item) -> tuple[str, str, str, str]:
    """(text before the pronoun, the male pronoun, text after it, case) of the male version,
    split where the male and female versions differ (one word, maybe with punctuation after)."""
    pre, mids, suf = _diff([it.sentences["male"], it.sentences["female"]])
    word = mids[0]
    core = word.rstrip(".,;:!?\"'")
    case = {"he": "nom", "him": "acc", "his": "poss"}.get(core.lower())
    if case is None:
        raise EttinError(f"winogender: cannot find the pronoun in {it.sentences['male']!r} (got {word!r})")
    return pre, core, word[len(core):] + (" " + suf if suf else ""), case


def gotcha_scores(em, items: list[Item], opts) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per item, a score per gender (male, female, neutral; higher = preferred) and, for
    encoders, the normalised probability mass of each gender."""
    cfg = em.config
    tok = em.tokenizer
    if not em.is_encoder:
        sents = [it.sentences[g] for it in items for g in GENDERS]
        encs = tok.encode_batch(sents)
        reqs = [([cfg.cls_id], ids) for ids in encs]
        res = scoring.loglikelihood(em.model, reqs, pad_id=cfg.pad_id, batch_size=opts.batch_size, max_length=opts.max_length)
        per_tok = [ll / max(1, len(ids)) for (ll, _), ids in zip(res, encs)]  # minus log per-token perplexity
        return [per_tok[3 * k:3 * k + 3] for k in range(len(items))], None
    shift = 1 if cfg.objective == "mntp" else 0
    rows, owner = [], []
    for k, it in enumerate(items):
        before, male_word, after, case = _pronoun(it)
        ctx, cont = scoring.split_pair(tok, before, (" " if before else "") + male_word)
        whole = tok.encode(before + (" " if before else "") + male_word + after)
        right = whole[len(ctx) + len(cont):] + [cfg.sep_id]
        left = [cfg.cls_id] + ctx
        for j, g in enumerate(GENDERS):
            variants = []
            for form in dict.fromkeys((FORMS[case][j], FORMS[case][j].capitalize())):
                _, ftoks = scoring.split_pair(tok, before, (" " if before else "") + form)
                if ftoks and ftoks not in variants:
                    variants.append(ftoks)
            for ftoks in variants:
                p = len(left)
                ids = left + list(ftoks) + right
                pos = tuple(range(p, p + len(ftoks)))
                rows.append(scoring.Row(ids, pos, tuple(q - shift for q in pos), tuple(ftoks), len(owner)))
                owner.append((k, j))
    res = scoring.run_rows(em.model, rows, pad_id=cfg.pad_id, mask_id=cfg.mask_id, batch_size=opts.batch_size)
    mass = [[0.0, 0.0, 0.0] for _ in items]
    for (k, j), (lp, _) in zip(owner, res):
        mass[k][j] += math.exp(lp)
    logm = [[math.log(m) if m > 0 else float("-inf") for m in ms] for ms in mass]
    shares = [[m / sum(ms) if sum(ms) > 0 else 1 / 3 for m in ms] for ms in mass]
    return logm, shares


def _run_gotcha(em, data: WinoData, opts, samples: list | None) -> dict:
    sc, shares = gotcha_scores(em, data.items, opts)
    picks = [max(range(3), key=lambda j: (s[j], -j)) for s in sc]
    n = len(data.items)
    out: dict = {g: sum(1 for p in picks if p == j) / n for j, g in enumerate(GENDERS)}
    hit = [float(GENDERS[p] == it.gotcha) for p, it in zip(picks, data.items)]
    out["gotcha_preferred"] = sum(hit) / n
    if shares is not None:
        for j, g in enumerate(GENDERS):
            out[f"mass_{g}"] = sum(s[j] for s in shares) / n
    out["n"] = n
    out["protocol"] = "gotcha"
    if samples is not None:
        for k, (it, s, p) in enumerate(zip(data.items, sc, picks)):
            m = {g: float(p == j) for j, g in enumerate(GENDERS)}
            m["gotcha_preferred"] = hit[k]
            if shares is not None:
                m.update({f"mass_{g}": shares[k][j] for j, g in enumerate(GENDERS)})
            samples.append({"id": f"{it.occupation}.{it.participant}.{it.answer}.{it.gotcha}", "label": it.gotcha,
                            "prediction": GENDERS[p], "scores": list(s), "metrics": m})
    return out


def run(em, spec, data: WinoData, opts, samples: list | None = None) -> dict:
    if data.protocol == "gotcha":
        return _run_gotcha(em, data, opts, samples)
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
    out["protocol"] = "all"
    return out
