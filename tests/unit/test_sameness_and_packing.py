"""Strict sameness (what may share an answer) and packed-call formatting and parsing."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from ops.simulator import answer_for, parse_packed
from workers.packing import (
    MIN_SHARED_PREFIX,
    packed_user_content,
    parse_packed_answers,
    split_shared_prefix,
)
from workers.sameness import exact_digest, strict_signature, strictly_same


def test_exact_duplicates_after_normalization() -> None:
    assert exact_digest("How do I reset my PIN?") == exact_digest("  how do i   reset my pin ")
    assert exact_digest("Café") == exact_digest("Cafe\u0301")  # NFC
    assert exact_digest("reset my PIN") != exact_digest("reset my card")


def test_strict_test_merges_rewordings_that_keep_every_content_word_in_order() -> None:
    assert strictly_same("How do I reset my PIN?", "how can I reset my pin please")
    assert strictly_same("Can you tell me my card balance", "could you please tell me my card balance")
    assert strictly_same("I'm still waiting for my card.", "I am still waiting for my card")
    assert not strictly_same("My card isn't working", "My card is working")


def test_strict_test_refuses_reordered_or_changed_words() -> None:
    # PAWS-style: same words, different meaning.
    assert not strictly_same("Flights from New York to London", "Flights from London to New York")
    assert not strictly_same("My card was not charged", "My card was charged")
    assert not strictly_same("Transfer 100 dollars", "Transfer 1000 dollars")
    assert not strictly_same("Why was my card declined?", "Why was my transfer declined?")
    assert not strictly_same("Did you receive my transfer?", "Did I receive your transfer?")
    assert not strictly_same("How long does a transfer take?", "How long does a US transfer take?")


def test_too_short_texts_have_no_signature() -> None:
    assert strict_signature("hi") is None
    assert strict_signature("balance") is None


def test_packed_round_trip_with_the_simulator_protocol() -> None:
    questions = ["What is the fee?", "How long does it take?\nAnd on weekends?"]
    content = packed_user_content(questions, "Document text.")
    context, parsed = parse_packed(content)
    assert context == "Document text."
    assert [q for _, q in parsed] == questions
    reply = json.dumps({"answers": [{"id": n, "answer": answer_for(q, context)} for n, q in parsed]})
    answers = parse_packed_answers(reply, 2)
    assert answers.missing == ()
    assert answers.answers[2] == answer_for(questions[1], "Document text.")


def test_packed_parse_reports_missing_extra_and_repeated_answers() -> None:
    reply = json.dumps({"answers": [{"id": 1, "answer": "a"}, {"id": 1, "answer": "b"}, {"id": 3, "answer": "c"},
                                    {"id": 9, "answer": "x"}, {"id": "2", "answer": 5}]})
    parsed = parse_packed_answers(reply, 3)
    assert parsed.answers == {3: "c"}
    assert parsed.missing == (1, 2)
    assert parse_packed_answers("not json", 2).missing == (1, 2)
    assert parse_packed_answers('{"answers": {}}', 1).missing == (1,)


@given(st.text(max_size=300), st.integers(min_value=1, max_value=20))
def test_packed_parse_never_raises_and_never_invents_ids(body: str, count: int) -> None:
    parsed = parse_packed_answers(body, count)
    assert set(parsed.answers) | set(parsed.missing) == set(range(1, count + 1))
    assert not set(parsed.answers) & set(parsed.missing)


def test_shared_prefix_becomes_the_context() -> None:
    document = "The Premium account costs 5 euros a month and includes travel insurance. " * 4
    prompts = [document + "\nWhat does it cost?", document + "\nDoes it include insurance?"]
    context, rests = split_shared_prefix(prompts)
    assert context is not None and len(context) >= MIN_SHARED_PREFIX
    assert rests == ["What does it cost?", "Does it include insurance?"]
    assert split_shared_prefix(["short one", "short two"]) == (None, ["short one", "short two"])


def test_packing_pays_only_when_questions_share_a_context_or_system_message() -> None:
    from workers.packing import packing_saves

    short = ["How do I reset my PIN?"] * 16
    assert not packing_saves(short, None, None, output_price_ratio=3.0)
    assert packing_saves(short, "A shared document. " * 40, None, output_price_ratio=3.0)
    assert packing_saves(short[:4], None, "You are a careful banking assistant. " * 20, output_price_ratio=3.0)
    assert not packing_saves(short[:1], "A shared document. " * 40, None, output_price_ratio=3.0)
