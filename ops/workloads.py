"""Workloads for the demo and the benchmarks, built from the shared data sets or generated.

- ``support_stream``: support-style questions with natural paraphrases and repeats (generated).
- ``banking77_stream``: Banking77 queries in file order (real customer phrasing, 77 intents).
- ``repeated_stream``: a stream where each query is asked several times, the counts drawn from a
  Zipf-like law (most asked once, a few asked many times), repeats arriving close together
  (a burst of users with the same problem), as support traffic does.
- ``documents_workload``: many questions about a few documents (one document's text followed by
  a question, as a retrieval-augmented service sends them).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data sets: ``COHORT_DATA_DIR``, or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("COHORT_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str | None = None
    """An intent or document label, where the data set has one (for purity reports)."""
    context: str | None = None


def banking77(limit: int | None = None, *, seed: int | None = 0) -> list[Prompt]:
    """Banking77 train queries, shuffled with ``seed`` (the file is sorted by intent); ``None`` keeps file order."""
    path = data_dir() / "banking77" / "train.csv"
    with path.open(encoding="utf-8") as fh:
        rows = [Prompt(r["text"], r["category"]) for r in csv.DictReader(fh)]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def read_prompt_file(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Prompts from a CSV with a ``text`` column, a JSONL file with ``prompt``/``text``, or plain lines."""
    path = Path(path)
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as fh:
        if path.suffix == ".csv":
            for row in csv.DictReader(fh):
                text = row.get("text") or row.get("prompt") or ""
                if text.strip():
                    prompts.append(Prompt(text, row.get("category") or row.get("label")))
        elif path.suffix == ".jsonl":
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    text = row.get("prompt") or row.get("text") or row.get("instruction") or ""
                    if isinstance(text, str) and text.strip():
                        prompts.append(Prompt(text, row.get("category"), row.get("context")))
        else:
            prompts = [Prompt(line.rstrip("\n")) for line in fh if line.strip()]
    return prompts[:limit] if limit else prompts


def repeat_counts(n: int, *, seed: int = 0, exponent: float = 1.6, cap: int = 20) -> list[int]:
    """How often each of ``n`` queries is asked: Zipf-distributed (P(k) ~ k^-exponent), 1..cap."""
    rng = random.Random(seed)
    weights = [k ** -exponent for k in range(1, cap + 1)]
    return rng.choices(range(1, cap + 1), weights=weights, k=n)


def repeated_stream(prompts: list[Prompt], *, seed: int = 0, burst: int = 64) -> list[Prompt]:
    """Each prompt asked ``repeat_counts`` times; repeats land within ``burst`` positions of the first."""
    rng = random.Random(seed)
    counts = repeat_counts(len(prompts), seed=seed)
    slots: list[tuple[float, Prompt]] = []
    for position, (prompt, count) in enumerate(zip(prompts, counts, strict=True)):
        for _ in range(count):
            slots.append((position + rng.uniform(0, burst), prompt))
    slots.sort(key=lambda s: s[0])
    return [p for _, p in slots]


def documents_workload(*, documents: int = 8, questions_per_document: int = 24, seed: int = 0) -> list[Prompt]:
    """Questions about a few documents: each prompt is a document's text followed by one question.

    Documents are self-instruct task instances long enough to read as a passage (at least 600
    characters, joined from consecutive instances); questions are Banking77-style and generic
    reading questions. Prompts of different documents are interleaved.
    """
    rng = random.Random(seed)
    passages = _passages(documents)
    questions = [
        "Summarize the passage in one sentence.", "What is the main point of the passage?",
        "List the key facts mentioned.", "Which numbers or dates appear in it?",
        "Who is the intended reader?", "What action does the passage ask for?",
        "Is anything in the passage ambiguous?", "Give a title for the passage.",
        "What would be a good follow-up question?", "Rewrite the first sentence more simply.",
        "What is the tone of the passage?", "Name one thing missing from the passage.",
    ]
    prompts: list[Prompt] = []
    for index, passage in enumerate(passages):
        for q in range(questions_per_document):
            question = questions[q % len(questions)]
            if q >= len(questions):
                question += f" (part {q // len(questions) + 1})"
            prompts.append(Prompt(f"{passage}\n\nQuestion: {question}", f"doc{index}"))
    rng.shuffle(prompts)
    return prompts


def _passages(count: int) -> list[str]:
    path = data_dir() / "self_instruct" / "user_oriented_instructions.jsonl"
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            for instance in row.get("instances", []):
                text = (instance.get("input") or "").strip()
                if len(text) > 80:
                    texts.append(text)
    passages: list[str] = []
    current = ""
    for text in texts:
        current = f"{current}\n{text}".strip()
        if len(current) >= 600:
            passages.append("Passage:\n" + current[:1500])
            current = ""
        if len(passages) == count:
            break
    return passages


# --- generated support traffic -----------------------------------------------------------------
_TOPICS = {
    "card_lost": ["I lost my card, what should I do?", "My card is lost, how do I block it?",
                  "what do i do if i lost my debit card", "How can I freeze my card? I can't find it."],
    "pin_reset": ["How do I reset my PIN?", "how can I reset my pin please", "I forgot my PIN code, how to change it?",
                  "Where can I change my card PIN?"],
    "transfer_pending": ["Why is my transfer still pending?", "My transfer hasn't arrived yet.",
                         "how long does a bank transfer take", "The money I sent is still not there, why?"],
    "refund": ["How do I get a refund for a purchase?", "I want my money back for an order.",
               "Can I request a refund from a merchant?", "how to dispute a card payment"],
    "fees": ["What fees do you charge for top ups?", "Is there a fee for topping up by card?",
             "Why was I charged a fee?", "what are the exchange rate fees"],
    "verify": ["How do I verify my identity?", "Why do I need to verify my identity?",
               "what documents do i need for verification", "My identity verification failed, why?"],
    "address": ["How do I change my address?", "I moved house, how do I update my address?",
                "Can I change my billing address in the app?"],
    "declined": ["Why was my card declined?", "My card payment was declined at a shop.",
                 "why does my card keep getting declined", "Card declined online, what's wrong?"],
}


def support_stream(count: int = 600, *, seed: int = 0) -> list[Prompt]:
    """Support questions with paraphrases and repeats: a few popular questions asked many times."""
    rng = random.Random(seed)
    topics = list(_TOPICS)
    weights = [1.0 / (rank + 1) for rank in range(len(topics))]
    prompts: list[Prompt] = []
    for _ in range(count):
        topic = rng.choices(topics, weights=weights)[0]
        text = rng.choice(_TOPICS[topic])
        if rng.random() < 0.15:
            text = text.lower().rstrip("?.") + ("?" if rng.random() < 0.5 else "")
        prompts.append(Prompt(text, topic))
    return prompts


def stream_of(name: str, limit: int | None = None) -> list[Prompt]:
    """A named workload: ``support``, ``banking77``, ``banking77-repeated``, ``documents``, or a file path."""
    if name == "support":
        return support_stream(limit or 600)
    if name == "banking77":
        return banking77(limit)
    if name == "banking77-repeated":
        stream = repeated_stream(banking77(limit and max(1, limit // 3)))
        return stream[:limit] if limit else stream
    if name == "documents":
        prompts = documents_workload()
        return prompts[:limit] if limit else prompts
    return read_prompt_file(name, limit)


def iter_lines(prompts: list[Prompt]) -> Iterator[str]:
    for prompt in prompts:
        yield prompt.text
