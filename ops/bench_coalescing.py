"""Coalescing safety: how often the sameness test would answer two different requests once, and
how often it finds real duplicates, on PAWS-Wiki dev and STS-B dev.

Usage: ``python -m ops.bench_coalescing [--out PATH] [--cache-dir DIR]``.

A pair is *merged* (answered once) by Cohort's test when, as the grouper runs it:
``exact_digest`` equal (same text after normalization), OR ``strict_signature`` equal (same
content words in the same order) AND embedding cosine >= ``near_duplicate_threshold``
(default 0.9). For comparison the table also shows exact digests alone, the signature without
the cosine check, and cosine alone at 0.85 / 0.9 / 0.95 / 0.99.

- False merges: PAWS dev pairs labelled non-paraphrase (0), and STS-B dev pairs scored below 4.0.
- Recall: PAWS dev paraphrases (1), and STS-B dev pairs scored 5.0 (people judged them equivalent).

PAWS and STS-B pairs almost never have equal signatures unless they are near-identical, so
the cosine check hardly binds there. Two further checks show what it does: all pairs of Banking77
train queries (not exact duplicates) whose strict signatures are equal, split by whether the two
queries carry the same intent label, merged or not at each cosine threshold; and a few
handwritten probes (pronoun swaps, a dropped negation) that a signature must keep apart.

Zero events out of n trials still leave an upper bound: the 95% bound is printed (``3/n``,
the rule of three). Embeddings are all-MiniLM-L6-v2, cached under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.bench_clustering import DEFAULT_CACHE, embed_cached, paws_dev, stsb_dev
from ops.workloads import banking77
from workers.sameness import exact_digest, strict_signature
from workers.settings import GroupingSettings

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "coalescing.md"
FLOOR_FALSE_MERGES = 0.005
COSINE_ONLY = (0.85, 0.9, 0.95, 0.99)
SWEEP = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
PROBES = (
    ("Did you receive my transfer?", "Did I receive your transfer?"),
    ("Should I send you the money?", "Should you send me the money?"),
    ("Can I cancel the transfer?", "Can you cancel the transfer?"),
    ("How long does a transfer take?", "How long does a US transfer take?"),
    ("Why can't I top up?", "Why can I top up?"),
    ("Is my card blocked?", "My card is blocked."),
)


def banking77_signature_pairs(cache_dir: Path) -> list[tuple[float, bool, str, str, str, str]]:
    """(cosine, same intent, text a, text b, intent a, intent b) for Banking77 queries with equal
    strict signatures that are not exact duplicates."""
    prompts = banking77()
    vectors = embed_cached([p.text for p in prompts], cache_dir)
    by_signature: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        signature = strict_signature(p.text)
        if signature is not None:
            by_signature.setdefault(signature, []).append(i)
    pairs = []
    for rows in by_signature.values():
        for x, i in enumerate(rows):
            for j in rows[x + 1:]:
                a, b = prompts[i], prompts[j]
                if exact_digest(a.text) != exact_digest(b.text):
                    pairs.append((float(vectors[i] @ vectors[j]), a.label == b.label, a.text, b.text,
                                  a.label or "", b.label or ""))
    return sorted(pairs)


def banking77_section(cache_dir: Path, default: float) -> list[str]:
    pairs = banking77_signature_pairs(cache_dir)
    same = sum(p[1] for p in pairs)
    lines = ["## Banking77: queries with equal strict signatures", "",
             f"{len(pairs):,} pairs of Banking77 train queries (not exact duplicates) have equal strict signatures: "
             f"{same:,} with the same intent label, {len(pairs) - same:,} with different labels. "
             "Merged at each cosine threshold:", "",
             "| t | same-intent pairs merged | different-intent pairs merged |", "|---:|---:|---:|"]
    for t in SWEEP:
        merged_same = sum(1 for c, s, *_ in pairs if s and c >= t)
        merged_diff = sum(1 for c, s, *_ in pairs if not s and c >= t)
        mark = " (default)" if t == default else ""
        lines.append(f"| {t}{mark} | {merged_same:,} / {same:,} | {merged_diff:,} / {len(pairs) - same:,} |")
    lines += ["", "Different-intent pairs (some are label noise):", ""]
    for c, s, a, b, la, lb in pairs:
        if not s:
            verdict = "merged" if c >= default else "kept apart"
            lines.append(f"- cos {c:.3f}, {verdict} at {default}: `{a.strip()}` ({la}) / `{b.strip()}` ({lb})")
    return lines + [""]


def probes_section(cache_dir: Path, default: float) -> list[str]:
    vectors = embed_cached([t for pair in PROBES for t in pair], cache_dir)
    lines = ["## Handwritten probes", "",
             "| a | b | equal signature | cosine | merged at the default |", "|---|---|---|---:|---|"]
    for k, (a, b) in enumerate(PROBES):
        cosine = float(vectors[2 * k] @ vectors[2 * k + 1])
        sig = strict_signature(a) is not None and strict_signature(a) == strict_signature(b)
        merged = exact_digest(a) == exact_digest(b) or (sig and cosine >= default)
        lines.append(f"| {a} | {b} | {'yes' if sig else 'no'} | {cosine:.3f} | {'**yes**' if merged else 'no'} |")
    return lines + [""]


@dataclass(frozen=True)
class PairSet:
    name: str
    first: list[str]
    second: list[str]
    cosine: np.ndarray
    exact: np.ndarray
    signature: np.ndarray
    """Both signatures present and equal."""


def pair_set(name: str, pairs: Sequence[tuple[str, str]], cache_dir: Path) -> PairSet:
    first = [a for a, _ in pairs]
    second = [b for _, b in pairs]
    va = embed_cached(first, cache_dir)
    vb = embed_cached(second, cache_dir)
    cosine = np.sum(va * vb, axis=1)
    exact = np.array([exact_digest(a) == exact_digest(b) for a, b in pairs], dtype=bool)
    sigs = [(strict_signature(a), strict_signature(b)) for a, b in pairs]
    signature = np.array([sa is not None and sa == sb for sa, sb in sigs], dtype=bool)
    return PairSet(name, first, second, cosine, exact, signature)


Rule = Callable[[PairSet], np.ndarray]


def cohort_rule(threshold: float) -> Rule:
    return lambda s: s.exact | (s.signature & (s.cosine >= threshold))


def cosine_rule(threshold: float) -> Rule:
    return lambda s: s.cosine >= threshold


def _rate(merged: np.ndarray) -> str:
    n = len(merged)
    k = int(merged.sum())
    if k == 0:
        return f"0 / {n:,} (0%; 95% bound {3 / n:.2%})"
    return f"{k:,} / {n:,} ({k / n:.2%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="embedding cache directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write")
    parser.add_argument("--examples", type=int, default=5, help="false merges to show at the default settings")
    args = parser.parse_args(argv)
    default = GroupingSettings().near_duplicate_threshold

    paws = paws_dev()
    stsb = stsb_dev()
    paws_set = pair_set("paws", [(a, b) for a, b, _ in paws], args.cache_dir)
    stsb_set = pair_set("stsb", [(a, b) for a, b, _ in stsb], args.cache_dir)
    paws_label = np.array([label for _, _, label in paws])
    stsb_score = np.array([score for _, _, score in stsb])
    groups = {
        "PAWS non-paraphrase (false merge)": (paws_set, paws_label == 0),
        "STS-B < 4.0 (false merge)": (stsb_set, stsb_score < 4.0),
        "PAWS paraphrase (recall)": (paws_set, paws_label == 1),
        "STS-B = 5.0 (recall)": (stsb_set, stsb_score >= 5.0),
    }
    rules: list[tuple[str, Rule]] = [
        (f"**Cohort default**: exact OR (signature AND cosine >= {default})", cohort_rule(default)),
        ("exact digest only", lambda s: s.exact),
        ("exact OR signature (no cosine check)", lambda s: s.exact | s.signature),
        *[(f"cosine alone >= {t}", cosine_rule(t)) for t in COSINE_ONLY],
    ]
    header = "| test | " + " | ".join(groups) + " |"
    lines = [
        "# Coalescing safety",
        "",
        "`python -m ops.bench_coalescing`: all-MiniLM-L6-v2 cosine; `exact_digest` and `strict_signature` from "
        "`workers/sameness.py`. A pair counts as merged when the test would answer both prompts with one answer. "
        f"PAWS-Wiki dev: {len(paws):,} pairs ({int((paws_label == 0).sum()):,} non-paraphrases, "
        f"{int((paws_label == 1).sum()):,} paraphrases); STS-B dev: {len(stsb):,} pairs "
        f"({int((stsb_score < 4.0).sum()):,} below 4.0, {int((stsb_score >= 5.0).sum()):,} at 5.0). "
        "Zero counts show the 95% upper bound (rule of three).",
        "",
        header,
        "|---|" + "---:|" * len(groups),
    ]
    for name, rule in rules:
        cells = []
        for pairs, mask in groups.values():
            cells.append(_rate(rule(pairs)[mask]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += ["", "## near_duplicate_threshold sweep (exact OR signature AND cosine >= t)", "",
              "| t | " + " | ".join(groups) + " |", "|---:|" + "---:|" * len(groups)]
    for t in SWEEP:
        rule = cohort_rule(t)
        mark = " (default)" if t == default else ""
        lines.append(f"| {t}{mark} | " + " | ".join(_rate(rule(p)[m]) for p, m in groups.values()) + " |")

    worst = 0.0
    for label, (pairs, mask) in groups.items():
        if "false merge" in label:
            worst = max(worst, float(cohort_rule(default)(pairs)[mask].mean()))
    verdict = "met" if worst <= FLOOR_FALSE_MERGES else "MISSED"
    lines += ["", f"Floor: false merges at most {FLOOR_FALSE_MERGES:.1%} at the default settings: worst "
              f"{worst:.2%}, **{verdict}**.", ""]

    examples: list[str] = []
    for label, (pairs, mask) in groups.items():
        if "false merge" not in label:
            continue
        merged = np.flatnonzero(cohort_rule(default)(pairs) & mask)
        for i in merged[: args.examples]:
            examples.append(f"- {pairs.name} (cos {pairs.cosine[i]:.3f}): `{pairs.first[i]}` / `{pairs.second[i]}`")
    if examples:
        lines += ["False merges at the default settings (first few):", "", *examples, ""]
    signature_pairs = {label: int((pairs.signature & mask).sum()) for label, (pairs, mask) in groups.items()}
    lines += ["Pairs with equal strict signatures (before the cosine check): "
              + ", ".join(f"{k}: {v:,}" for k, v in signature_pairs.items()) + ".", ""]

    lines += banking77_section(args.cache_dir, default)
    lines += probes_section(args.cache_dir, default)
    report = "\n".join(lines)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
