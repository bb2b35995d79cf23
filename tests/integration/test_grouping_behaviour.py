"""Grouping behaviour on the real stack: coalescing scopes and switches, the semantic cache,
context packing (explicit and by shared prefix), packed-answer miscounts, deadlines, full flushes.

Each test class runs its own stack on Redis db 5 (they never run at the same time: the db is
flushed when a stack starts). Upstream calls and tokens are read from the simulator's own counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from ops.simulator import answer_for, count_prompt_tokens, estimate_tokens
from producers import DeadlineExceeded, PromptResult
from tests.support.cluster import Cohort, run_cohort
from workers.packing import PACKED_SYSTEM, packed_user_content, single_user_content

DB = 5
TENANTS = {"tenants": {"acme": {}, "globex": {}, "solo": {"coalesce": False}, "cached": {"cache_ttl_s": 600.0}}}

DOCUMENT = (
    "Cohort Bank's premium account costs 7 euros a month. It includes travel insurance for the account holder "
    "and a partner, two free ATM withdrawals a month abroad up to 200 euros each, and exchange at the interbank "
    "rate on weekdays. On weekends a 0.5% markup applies to exchanges. The account can be cancelled at any time "
    "from the app; the fee for the current month is not refunded. Cards ordered with the account arrive within "
    "five working days, and a replacement card costs 5 euros after the first one."
)
QUESTIONS = [
    "How much does the premium account cost?", "Who is covered by the travel insurance?",
    "How many free ATM withdrawals abroad are included?", "What is the limit per free withdrawal?",
    "Which exchange rate applies on weekdays?", "What markup applies on weekends?",
    "How can the account be cancelled?", "Is the current month's fee refunded on cancellation?",
    "How long do cards take to arrive?", "What does a replacement card cost?",
    "Is the first replacement card free?", "Does the insurance cover a partner?",
]


class Counts:
    """Simulator counts since creation: upstream requests, questions answered, input tokens."""

    def __init__(self, cohort: Cohort) -> None:
        self._sim = cohort.sim
        self._start = self._now()

    def _now(self) -> tuple[int, int, int]:
        stats = self._sim.stats()
        return (int(stats["requests"]), sum(stats["prompts"].values()), sum(stats["tokens_in"].values()))

    def delta(self) -> dict[str, int]:
        now = self._now()
        return {name: a - b for name, a, b in zip(("requests", "prompts", "tokens_in"), now, self._start, strict=True)}


def _answers(cohort: Cohort, entries: Sequence[str | dict[str, Any]], timeout: float = 30.0, **common: Any
             ) -> list[PromptResult]:
    handles = cohort.client.submit_many(entries, **common)
    outcomes = cohort.client.wait([h.id for h in handles], timeout=timeout)
    assert all(isinstance(o, PromptResult) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def _assert_context_sent_once(tokens_in: int, document: str, questions: list[str]) -> None:
    """The packed call's input tokens hold the document once, far below one call per question."""
    without_document = count_prompt_tokens([PACKED_SYSTEM, packed_user_content(questions, None)])
    one_call_each = sum(count_prompt_tokens([single_user_content(q, document)]) for q in questions)
    assert tokens_in - without_document < 2 * estimate_tokens(document), (tokens_in, without_document)
    assert tokens_in < one_call_each / 4, (tokens_in, one_call_each)


def _one(cohort: Cohort, prompt: str, **fields: Any) -> PromptResult:
    return cohort.client.submit(prompt, **fields).result(timeout=30)


class TestGroupingBehaviour:
    @pytest.fixture(scope="class")
    def cohort(self) -> Iterator[Cohort]:
        with run_cohort(db=DB, config=TENANTS, concurrency=4) as running:
            yield running

    def test_exact_duplicates_are_answered_once_within_a_tenant_and_params_only(self, cohort: Cohort) -> None:
        text = "How do I reset my PIN?"
        counts = Counts(cohort)
        leader, duplicate, other_tenant, other_params = _answers(cohort, [
            {"prompt": text, "tenant": "acme"},
            {"prompt": "  how do I reset   my PIN ", "tenant": "acme"},  # equal after normalization
            {"prompt": text, "tenant": "globex"},
            {"prompt": text, "tenant": "acme", "max_tokens": 100},
        ])
        assert leader.text == answer_for(text) and not leader.coalesced
        assert duplicate.coalesced and duplicate.text == leader.text
        assert other_tenant.text == answer_for(text) and not other_tenant.coalesced
        assert other_params.text == answer_for(text) and not other_params.coalesced
        assert counts.delta()["prompts"] == 3  # acme once, globex once, acme with other params once

    def test_coalescing_off_per_request_and_per_tenant_gives_separate_calls(self, cohort: Cohort) -> None:
        text = "Why was my card payment declined at the shop?"
        first = _one(cohort, text, tenant="acme")
        assert first.text == answer_for(text)

        counts = Counts(cohort)
        again = _one(cohort, text, tenant="acme")  # control: the exact duplicate is served, no call
        assert again.cached and counts.delta()["requests"] == 0

        counts = Counts(cohort)
        alone = _one(cohort, text, tenant="acme", coalesce=False)
        assert not alone.coalesced and not alone.cached and alone.text == answer_for(text)
        assert counts.delta()["requests"] == 1

        solo_text = "How long does a transfer to another bank take?"
        counts = Counts(cohort)
        results = [_one(cohort, solo_text, tenant="solo") for _ in range(2)]
        assert all(not r.coalesced and not r.cached and r.text == answer_for(solo_text) for r in results)
        assert counts.delta()["requests"] == 2

        counts = Counts(cohort)  # submitted together: still two questions asked upstream
        together = _answers(cohort, ["Where can I see my card's PIN?"] * 2, tenant="solo")
        assert not any(r.coalesced for r in together)
        assert counts.delta()["prompts"] == 2

    def test_semantic_cache_serves_a_strict_rewording_only_to_the_opted_in_tenant(self, cohort: Cohort) -> None:
        first_text = "Can you tell me how to activate my new card?"
        rewording = "Hi! Can you please tell me how to activate my new card"
        for tenant, cached in (("cached", True), ("acme", False)):
            first = _one(cohort, first_text, tenant=tenant)
            counts = Counts(cohort)
            second = _one(cohort, rewording, tenant=tenant)
            if cached:
                assert second.cached and second.text == first.text
                assert counts.delta()["requests"] == 0
            else:
                assert not second.cached and second.text == answer_for(rewording)
                assert counts.delta()["requests"] == 1

    def test_questions_with_one_context_go_in_one_call_carrying_the_context_once(self, cohort: Cohort) -> None:
        counts = Counts(cohort)
        results = _answers(cohort, [{"prompt": q, "context": DOCUMENT} for q in QUESTIONS], tenant="acme")
        for question, result in zip(QUESTIONS, results, strict=True):
            assert result.text == answer_for(question, DOCUMENT)
            assert result.packed
        delta = counts.delta()
        assert delta["requests"] == 1
        _assert_context_sent_once(delta["tokens_in"], DOCUMENT, QUESTIONS)

    def test_a_long_shared_prefix_is_found_and_packed_the_same_way(self, cohort: Cohort) -> None:
        document = DOCUMENT.replace("Cohort Bank", "Globex Bank")
        counts = Counts(cohort)
        results = _answers(cohort, [f"{document}\n\n{q}" for q in QUESTIONS], tenant="globex")
        for question, result in zip(QUESTIONS, results, strict=True):
            assert result.text == answer_for(question, document)
            assert result.packed
        delta = counts.delta()
        assert delta["requests"] == 1
        _assert_context_sent_once(delta["tokens_in"], document, QUESTIONS)

    def test_answers_missing_from_a_packed_reply_are_asked_again_one_by_one(self, cohort: Cohort) -> None:
        document = DOCUMENT.replace("Cohort Bank", "Initech Bank")
        questions = QUESTIONS[:6]
        cohort.sim.set_faults("*", packed_miscount_rate=1.0)
        try:
            counts = Counts(cohort)
            results = _answers(cohort, [{"prompt": q, "context": document} for q in questions], tenant="acme")
        finally:
            cohort.sim.set_faults("*", packed_miscount_rate=0.0)
        for question, result in zip(questions, results, strict=True):
            assert result.text == answer_for(question, document)
        assert sum(not r.packed for r in results) == 1  # the one the reply dropped
        assert counts.delta()["requests"] == 2

    def test_the_same_prompt_under_different_system_messages_is_not_coalesced(self, cohort: Cohort) -> None:
        counts = Counts(cohort)
        french, german = _answers(cohort, [{"prompt": "Translate 'good morning'.", "system": "Reply in French."},
                                           {"prompt": "Translate 'good morning'.", "system": "Reply in German."}],
                                  tenant="globex")
        assert not french.coalesced and not german.coalesced
        assert counts.delta()["prompts"] == 2

    def test_prompts_with_different_system_messages_never_share_a_call(self, cohort: Cohort) -> None:
        first, second = _answers(cohort, [{"prompt": "Say hello to the customer.", "system": "Reply in French."},
                                          {"prompt": "Say goodbye to the customer.", "system": "Reply in German."}],
                                 tenant="globex")
        assert first.batch_id != second.batch_id

    def test_an_exact_duplicate_of_a_near_duplicate_follower_is_answered(self, cohort: Cohort) -> None:
        first = "Hi, I would like to know how to order a spare card."
        rewording = "Hello, I would like to know how to order a spare card, please."
        cohort.sim.set_faults("*", latency_ms=1500.0)
        try:
            leader = cohort.client.submit(first, tenant="globex")
            time.sleep(0.9)  # the leader is in flight: the rewording follows it
            follower = cohort.client.submit(rewording, tenant="globex")
            joined = cohort.client.wait([leader.id, follower.id], timeout=20)[1]
            assert isinstance(joined, PromptResult) and joined.coalesced
        finally:
            cohort.sim.set_faults("*", latency_ms=0.0)
        again = cohort.client.submit(rewording, tenant="globex")
        assert isinstance(cohort.client.wait([again.id], timeout=6, raise_on_timeout=False)[0], PromptResult)

    def test_a_follower_deadline_is_honoured_while_its_leader_is_slow(self, cohort: Cohort) -> None:
        cohort.sim.set_faults("*", latency_ms=4000.0)
        try:
            leader = cohort.client.submit("When will my replacement card arrive?", tenant="globex")
            time.sleep(0.6)  # the leader is in flight
            follower = cohort.client.submit("When will my replacement card arrive?", tenant="globex", deadline=1.0)
            outcome = cohort.client.wait([follower.id], timeout=20)[0]
            cohort.client.wait([leader.id], timeout=20)
        finally:
            cohort.sim.set_faults("*", latency_ms=0.0)
        assert isinstance(outcome, DeadlineExceeded), outcome

    def test_a_deadline_ends_in_deadline_exceeded_not_a_hang(self, cohort: Cohort) -> None:
        cohort.sim.set_faults("*", latency_ms=5000.0)
        try:
            started = time.monotonic()
            handle = cohort.client.submit("What is my current balance?", tenant="acme", deadline=1.0)
            with pytest.raises(DeadlineExceeded):
                handle.result(timeout=20)
            assert time.monotonic() - started < 6.0
        finally:
            cohort.sim.set_faults("*", latency_ms=0.0)


class TestFullPartitionFlush:
    @pytest.fixture(scope="class")
    def slow_cohort(self) -> Iterator[Cohort]:
        # Every item held up to 30 s, packable or not: only a full partition flushes early.
        config = {"grouping": {"max_wait_s": 30.0, "wait_for_packing_only": False}}
        with run_cohort(db=DB, config=config, concurrency=4) as running:
            yield running

    def test_a_partition_reaching_the_batch_size_is_flushed_at_once(self, slow_cohort: Cohort) -> None:
        size = slow_cohort.client.settings.max_batch_size
        prompts = [f"Question number {n}: how do I order card {n}?" for n in range(size)]
        started = time.monotonic()
        results = _answers(slow_cohort, prompts, timeout=25)
        assert time.monotonic() - started < 10.0  # max_wait_s is 30 s
        assert len({r.batch_id for r in results}) == 1
        assert [r.text for r in results] == [answer_for(p) for p in prompts]
