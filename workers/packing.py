"""Packing several questions into one model call, and matching the answers back.

A packed call carries the shared context once and the numbered questions, and asks for JSON
(``packing_saves`` decides whether packing a set of questions is worth it)::

    Context:
    <the shared document>

    Questions:
    [1] first question
    [2] second question

Reply: ``{"answers": [{"id": 1, "answer": "..."}, {"id": 2, "answer": "..."}]}``.

``parse_packed_answers`` validates the reply: answers for unknown, repeated or missing ids, or
an unparsable body, are reported as missing, and the caller sends those items again one by one.
No answer is ever attributed to an item whose number it does not carry.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from workers.tiers.tokens import CHARS_PER_TOKEN, PER_MESSAGE_TOKENS, REPLY_PRIMER_TOKENS

PACKED_SYSTEM = (
    "You answer several independent questions. Reply with JSON only, in the form "
    '{"answers": [{"id": <question number>, "answer": "<answer>"}]}, one entry per question, '
    "using the numbers given."
)
MIN_SHARED_PREFIX = 200
"""A prompt prefix this long (characters) shared by several items is packed as their context."""
PREFIX_PROBE = 160
"""Characters of a prompt's start used to find items that may share a long prefix."""


JSON_ANSWER_OVERHEAD_TOKENS = 12
"""Output tokens a packed reply spends per question on its JSON frame (``{"id": n, "answer": ...}``)."""


def _tokens(text: str | None) -> int:
    return 0 if not text else math.ceil(len(text) / CHARS_PER_TOKEN)


def packing_saves(questions: Sequence[str], context: str | None, system: str | None, *,
                  output_price_ratio: float) -> bool:
    """Whether one packed call costs less than one call per question.

    Packing sends the shared context and system message once instead of once per question, and
    pays for the packing instructions and a JSON frame around every answer (output tokens, priced
    ``output_price_ratio`` times input tokens). Unrelated short questions gain nothing from it:
    they are sent as separate calls (concurrently), and only what shares a context is packed.
    """
    n = len(questions)
    if n < 2:
        return False
    shared = _tokens(context) + _tokens(system) + PER_MESSAGE_TOKENS * (2 if system else 1) + REPLY_PRIMER_TOKENS
    saved = (n - 1) * shared
    numbering = sum(_tokens(f"[{i}] ") for i in range(1, n + 1))
    frames = n * JSON_ANSWER_OVERHEAD_TOKENS * output_price_ratio
    extra = _tokens(PACKED_SYSTEM) + PER_MESSAGE_TOKENS + numbering + frames
    return saved > extra


@dataclass(frozen=True)
class PackedAnswers:
    answers: dict[int, str]
    """Answer text by question number, for the numbers that were answered validly."""
    missing: tuple[int, ...]
    """Question numbers without a valid answer: to be sent again individually."""


def single_user_content(question: str, context: str | None) -> str:
    """The user message of a call answering one question (with its context, if any)."""
    if context:
        return f"Context:\n{context}\n\nQuestion:\n{question}"
    return question


def packed_user_content(questions: Sequence[str], context: str | None) -> str:
    """The user message of a packed call: the context once, then the numbered questions."""
    lines = []
    if context:
        lines += ["Context:", context, ""]
    lines.append("Questions:")
    lines += [f"[{n}] {q}" for n, q in enumerate(questions, start=1)]
    return "\n".join(lines)


def parse_packed_answers(body: str, count: int) -> PackedAnswers:
    """Match a packed reply back to question numbers ``1..count``; never guesses."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return PackedAnswers({}, tuple(range(1, count + 1)))
    entries = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return PackedAnswers({}, tuple(range(1, count + 1)))
    answers: dict[int, str] = {}
    repeated: set[int] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        number, text = entry.get("id"), entry.get("answer")
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(text, str):
            continue
        if not 1 <= number <= count:
            continue
        if number in answers:
            repeated.add(number)
        answers[number] = text
    for number in repeated:
        answers.pop(number, None)
    missing = tuple(n for n in range(1, count + 1) if n not in answers)
    return PackedAnswers(answers, missing)


def prefix_key(prompt: str) -> str | None:
    """Key of the items that may share a long prompt prefix (one document, many questions)."""
    if len(prompt) < MIN_SHARED_PREFIX + 20:
        return None
    return hashlib.sha1(prompt[:PREFIX_PROBE].encode()).hexdigest()[:16]


def split_shared_prefix(prompts: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split prompts into a shared context (their long common prefix) and the remainders.

    The prefix is cut back to a line or sentence boundary; it counts only if at least
    ``MIN_SHARED_PREFIX`` characters long and every remainder is non-empty.
    """
    if len(prompts) < 2:
        return None, list(prompts)
    common = os.path.commonprefix(list(prompts))
    cut = max(common.rfind("\n"), common.rfind(". ") + 1, common.rfind("? ") + 1)
    if cut < MIN_SHARED_PREFIX:
        return None, list(prompts)
    context = common[:cut].strip()
    rests = [p[cut:].strip() for p in prompts]
    if len(context) < MIN_SHARED_PREFIX or not all(rests):
        return None, list(prompts)
    return context, rests
