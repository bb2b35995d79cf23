"""Deciding whether two prompts are the same request (and may share one answer).

Two tests, from loose to strict:

- ``exact_digest``: equal after normalization (Unicode NFC, case, whitespace, trailing
  punctuation). Always the same request.
- ``strict_signature``: equal sequences of content words, in order, with numbers, negations and
  operators kept. Embedding cosine alone cannot see word order or a swapped name (PAWS pairs
  share every word and mean different things); this signature does. Near-duplicates are merged
  only when their signatures are equal AND their embeddings agree (cosine >= a high threshold).
"""

from __future__ import annotations

import hashlib
import re

from producers.schema import normalize_text

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|\d+(?:[.,]\d+)*|[%$€£+\-*/=<>]", re.UNICODE)

# Words whose presence or absence does not change what is asked. Negations, quantifiers,
# pronouns ("my transfer" is not "your transfer"), question words and prepositions are
# deliberately absent: they change meaning.
FILLER_WORDS = frozenset({
    "a", "an", "the", "please", "pls", "kindly", "hi", "hello", "hey", "thanks", "thank", "just",
    "can", "could", "would", "do", "does", "is", "are", "am", "be", "it", "its", "this", "that",
    "there", "here", "really", "actually",
})


def exact_digest(text: str) -> str:
    """Digest of the normalized text: equal digests mean the same request."""
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


_CONTRACTIONS = ((re.compile(r"\bcan't\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
                 (re.compile(r"n't\b"), " not"), (re.compile(r"'m\b"), " am"), (re.compile(r"'re\b"), " are"),
                 (re.compile(r"'ve\b"), " have"), (re.compile(r"'ll\b"), " will"), (re.compile(r"'d\b"), " would"),
                 (re.compile(r"'s\b"), " is"))


def content_words(text: str) -> list[str]:
    """The ordered content words of a text (contractions expanded, fillers dropped, the rest kept)."""
    text = normalize_text(text).replace("\u2019", "'")
    for pattern, expansion in _CONTRACTIONS:
        text = pattern.sub(expansion, text)
    return [w.replace("'", "") for w in _WORD.findall(text) if w not in FILLER_WORDS]


def strict_signature(text: str) -> str | None:
    """Digest of the content-word sequence; ``None`` when too few words to judge safely."""
    words = content_words(text)
    if len(words) < 2:
        return None
    return hashlib.sha1(" ".join(words).encode()).hexdigest()


def strictly_same(a: str, b: str) -> bool:
    """True when two texts pass the strict test (equal exact digests or equal signatures)."""
    if exact_digest(a) == exact_digest(b):
        return True
    sig = strict_signature(a)
    return sig is not None and sig == strict_signature(b)
