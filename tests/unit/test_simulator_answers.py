"""The simulator's deterministic answers and prompt parsing, without a server."""

from __future__ import annotations

import re

import pytest

from ops.simulator import (
    Knobs,
    SimulatorState,
    answer_for,
    count_prompt_tokens,
    estimate_tokens,
    parse_packed,
    parse_single,
    truncate_to_tokens,
    validate_knobs,
)


@pytest.mark.parametrize(("text", "tokens"), [("", 1), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_estimate_tokens_is_a_quarter_of_the_characters_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_count_prompt_tokens_adds_a_few_per_message() -> None:
    assert count_prompt_tokens([]) == 3
    assert count_prompt_tokens(["abcd", "x" * 9]) == 3 + (4 + 1) + (4 + 3)


def test_answer_for_is_deterministic_and_tagged_by_the_text() -> None:
    answer = answer_for("What is the capital of France?")
    assert answer == answer_for("What is the capital of France?")
    assert re.fullmatch(r"Answer [0-9a-f]{10}: [a-z]+( [a-z]+)+\.", answer)
    assert answer != answer_for("What is the capital of Spain?")
    assert answer != answer_for("What is the capital of France?", "A document about Europe.")


def test_answer_for_ignores_whitespace_and_empty_context() -> None:
    base = answer_for("Why is\nthe sky blue?", "Line one.\nLine two.")
    assert answer_for("  Why is   the sky\tblue? ", "Line one.  Line two.\n") == base
    assert answer_for("q", "") == answer_for("q", None) == answer_for("q")


def test_answer_lengths_stay_in_a_useful_range() -> None:
    lengths = [estimate_tokens(answer_for(f"question number {i}")) for i in range(300)]
    assert min(lengths) >= 15 and max(lengths) <= 80
    assert len(set(lengths)) > 10  # lengths vary, so truncation and budgets get exercised


def test_truncate_to_tokens_cuts_to_the_limit() -> None:
    text = answer_for("long enough")
    assert truncate_to_tokens(text, None) == (text, False)
    assert truncate_to_tokens(text, 1000) == (text, False)
    cut, was_cut = truncate_to_tokens(text, 3)
    assert was_cut and cut == text[:12] and estimate_tokens(cut) == 3


def test_parse_packed_with_context_and_multiline_questions() -> None:
    content = (
        "Context:\nFirst line of the document.\n\nSecond paragraph, [1] not a question here.\n\n"
        "Questions:\n[1] What is the first line?\n[2] Summarise\nthe second paragraph.\n[10] Last one?\n"
    )
    context, questions = parse_packed(content)  # type: ignore[misc]
    assert context == "First line of the document.\n\nSecond paragraph, [1] not a question here."
    assert questions == [
        (1, "What is the first line?"),
        (2, "Summarise\nthe second paragraph."),
        (10, "Last one?"),
    ]


def test_parse_packed_without_context_and_with_crlf() -> None:
    assert parse_packed("Questions:\r\n[1] a?\r\n[2] b?") == (None, [(1, "a?"), (2, "b?")])


@pytest.mark.parametrize(
    "content",
    [
        "What is 2+2?",
        "Questions:\nno numbered items",
        "Context:\nsome text\n\nQuestion:\nsingle question",
        "Context:\nno questions header",
        "Questions:\n\n[1] blank line before the first item",
    ],
)
def test_parse_packed_rejects_other_formats(content: str) -> None:
    assert parse_packed(content) is None


def test_parse_single_splits_context_and_question() -> None:
    assert parse_single("What is 2+2?") == (None, "What is 2+2?")
    content = "Context:\nThe doc.\nMore.\n\nQuestion:\nWhat is it?\n"
    assert parse_single(content) == ("The doc.\nMore.", "What is it?")
    assert parse_single("Context:\nno question header") == (None, "Context:\nno question header")


def test_packed_and_single_parsing_agree_on_answers() -> None:
    context, questions = parse_packed("Context:\nShared doc.\n\nQuestions:\n[1] One?\n[2] Two\nlines?")  # type: ignore[misc]
    for _, question in questions:
        single_context, single_question = parse_single(f"Context:\nShared doc.\n\nQuestion:\n{question}")
        assert answer_for(question, context) == answer_for(single_question, single_context)


def test_knobs_are_validated_by_name_and_type() -> None:
    assert validate_knobs({"latency_ms": 5, "down": True}, "faults.m") == {"latency_ms": 5.0, "down": True}
    with pytest.raises(ValueError, match=r"faults\.m\.bogus: unknown knob"):
        validate_knobs({"bogus": 1}, "faults.m")
    with pytest.raises(ValueError, match="error_5xx_rate"):
        validate_knobs({"error_5xx_rate": 1.5}, "faults.m")
    with pytest.raises(ValueError, match="down"):
        validate_knobs({"down": "yes"}, "faults.m")


def test_model_knobs_override_the_default_and_reset_restores_start_up() -> None:
    state = SimulatorState(seed=1, faults={"*": {"latency_ms": 10}, "m": {"down": True}})
    state.set_faults("m", {"latency_ms": 3})
    assert state.knobs_for("m") == Knobs(latency_ms=3.0, down=True)
    assert state.knobs_for("other") == Knobs(latency_ms=10.0)
    state.reset()
    assert state.knobs_for("m") == Knobs(latency_ms=10.0, down=True)


def test_decisions_are_reproducible_for_a_seed() -> None:
    knobs = Knobs(error_5xx_rate=0.3, error_429_rate=0.2, jitter_ms=50, latency_ms=100)

    def run(seed: int) -> list[tuple[str, float]]:
        state = SimulatorState(seed=seed, faults={})
        return [(d.outcome, d.delay_s) for d in (state.decide(knobs, 2) for _ in range(50))]

    assert run(7) == run(7)
    assert run(7) != run(8)
    outcomes = {outcome for outcome, _ in run(7)}
    assert outcomes == {"ok", "5xx", "429"}
    assert all(0.15 <= delay <= 0.25 for _, delay in run(7))  # 2 x 100 ms, +/- 50 ms
