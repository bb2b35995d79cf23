"""How often the complexity estimate agrees with a labelled set built from the shared data.

Labelling rule (by source, decided before looking at the estimator's output):

- ``simple``: Banking77 customer-support queries (every 20th row of train.csv: 501 prompts):
  one short question a small model answers well.
- ``medium``: MT-Bench first turns in the writing, roleplay, extraction, stem and humanities
  categories (50): open generation and transformation tasks.
- ``complex``: MT-Bench first turns in math, reasoning and coding (30), and all 500 Arena-Hard
  v0.1 prompts (selected by their authors as hard, specific, problem-solving prompts).

Usage: ``python -m ops.bench_complexity [--data-dir DIR] [--show-misses N]``. The data directory
defaults to ``../shared/data`` next to the repository (``COHORT_DATA_DIR`` overrides).
Prints per-source and per-class agreement, the confusion matrix, and the share of complex
prompts sent to the cheapest tier as ``simple`` (the costly mistake).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from workers.tiers.complexity import explain

LABELS = ("simple", "medium", "complex")
MT_BENCH_MEDIUM = {"writing", "roleplay", "extraction", "stem", "humanities"}
MT_BENCH_COMPLEX = {"math", "reasoning", "coding"}


def data_dir(arg: str | None = None) -> Path:
    """The shared data directory: argument, ``COHORT_DATA_DIR``, or ``../shared/data``."""
    if arg:
        return Path(arg)
    if os.environ.get("COHORT_DATA_DIR"):
        return Path(os.environ["COHORT_DATA_DIR"])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def labelled_set(root: Path) -> list[tuple[str, str, str]]:
    """(source, label, prompt) rows, per the labelling rule in the module docstring."""
    rows: list[tuple[str, str, str]] = []
    with (root / "banking77" / "train.csv").open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if i % 20 == 0:
                rows.append(("banking77", "simple", row["text"]))
    with (root / "mt_bench" / "mt_bench_question.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)
            label = "medium" if q["category"] in MT_BENCH_MEDIUM else "complex"
            rows.append((f"mt_bench/{q['category']}", label, q["turns"][0]))
    with (root / "arena_hard" / "arena-hard-v0.1_question.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)
            rows.append(("arena_hard", "complex", q["prompt"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--show-misses", type=int, default=0, help="print up to N disagreements per class")
    args = parser.parse_args(argv)
    root = data_dir(args.data_dir)
    if not root.is_dir():
        print(f"data directory not found: {root} (set COHORT_DATA_DIR)", file=sys.stderr)
        return 2
    rows = labelled_set(root)
    confusion: Counter[tuple[str, str]] = Counter()
    by_source: dict[str, list[bool]] = defaultdict(list)
    misses: dict[str, list[str]] = defaultdict(list)
    for source, label, prompt in rows:
        guess = explain(prompt).label
        confusion[(label, guess)] += 1
        by_source[source.split("/")[0] if source.startswith("arena") else source].append(guess == label)
        if guess != label:
            misses[label].append(f"  [{source} -> {guess}] {prompt[:140]!r}")
    total = len(rows)
    agree = sum(n for (label, guess), n in confusion.items() if label == guess)
    print(f"labelled prompts: {total}; overall agreement {agree / total:.1%}")
    recalls = []
    print("\n| class | prompts | agreement |\n|---|---|---|")
    for label in LABELS:
        n = sum(confusion[(label, g)] for g in LABELS)
        recall = confusion[(label, label)] / n if n else 0.0
        recalls.append(recall)
        print(f"| {label} | {n} | {recall:.1%} |")
    print(f"\nmacro-average agreement (each class weighs the same): {sum(recalls) / len(recalls):.1%}")
    print("\n| source | prompts | agreement |\n|---|---|---|")
    for source in sorted(by_source):
        hits = by_source[source]
        print(f"| {source} | {len(hits)} | {sum(hits) / len(hits):.1%} |")
    print("\nconfusion (rows: label, columns: estimate)\n| | " + " | ".join(LABELS) + " |\n|---|---|---|---|")
    for label in LABELS:
        print(f"| {label} | " + " | ".join(str(confusion[(label, g)]) for g in LABELS) + " |")
    complex_n = sum(confusion[("complex", g)] for g in LABELS)
    print(f"\ncomplex prompts estimated simple (sent to the cheapest tier): "
          f"{confusion[('complex', 'simple')]}/{complex_n} ({confusion[('complex', 'simple')] / complex_n:.1%})")
    if args.show_misses:
        for label in LABELS:
            print(f"\nmisses labelled {label}:")
            print("\n".join(misses[label][: args.show_misses]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
