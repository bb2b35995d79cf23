"""Token counts known before a call, without a tokenizer.

Two figures, for two different questions:

- ``estimate_tokens`` (does the prompt fit a tier's context window?): about 4 characters per
  token for English text (the usual rule for BPE tokenizers), plus 4 tokens of framing per
  message and 3 for the reply primer, times ``CONTEXT_MARGIN`` (1.15) because code, numbers and
  non-Latin scripts tokenize denser than prose. A tier is skipped before any call when this
  estimate plus ``max_tokens`` exceeds its window. A prompt the estimate wrongly lets through
  costs one attempt: the provider answers with a context-length error and the item moves on
  to a larger tier.
- ``upper_bound_tokens`` (how much may this call cost at most?): a BPE token holds at least one
  byte, so the UTF-8 length plus framing can never be exceeded by the provider's count. Budget
  reservations use it (capped by the tier's window), so that settling to the reported usage never
  pushes spend above a cap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

CHARS_PER_TOKEN = 4.0
PER_MESSAGE_TOKENS = 4
REPLY_PRIMER_TOKENS = 3
CONTEXT_MARGIN = 1.15


def _contents(messages: Iterable[Mapping[str, str]]) -> list[str]:
    return [str(m.get("content") or "") for m in messages]


def estimate_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """Likely prompt tokens with the safety margin (for context-window checks)."""
    contents = _contents(messages)
    raw = sum(math.ceil(len(c) / CHARS_PER_TOKEN) + PER_MESSAGE_TOKENS for c in contents) + REPLY_PRIMER_TOKENS
    return math.ceil(raw * CONTEXT_MARGIN)


def upper_bound_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """Prompt tokens no tokenizer can exceed (for worst-case cost reservations)."""
    contents = _contents(messages)
    return sum(len(c.encode("utf-8")) + PER_MESSAGE_TOKENS for c in contents) + REPLY_PRIMER_TOKENS


def fits_context(context_window: int, prompt_estimate: int, max_tokens: int) -> bool:
    """True when the estimated prompt plus the requested output fit the window."""
    return prompt_estimate + max_tokens <= context_window
