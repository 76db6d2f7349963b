"""Run ids: sortable by creation, distinct in their short form, typed in any case."""

from __future__ import annotations

from jobrunner.store.ids import (
    ALPHABET,
    SHORT_ID_LENGTH,
    RunIdGenerator,
    decode_time_ms,
    new_run_id,
    normalise_prefix,
)


def test_ids_are_26_crockford_characters_in_creation_order() -> None:
    ids = [new_run_id() for _ in range(2000)]
    assert all(len(i) == 26 and set(i) <= set(ALPHABET) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_made_in_the_same_millisecond_differ_in_their_short_form() -> None:
    generate = RunIdGenerator()
    ids = [generate(now_ms=4_102_444_800_000) for _ in range(100)]
    assert ids == sorted(ids)
    assert len({i[:SHORT_ID_LENGTH] for i in ids}) == len(ids)
    # Hundreds of ids fit in one millisecond before the clock part has to move on.
    assert decode_time_ms(ids[-1]) - decode_time_ms(ids[0]) <= 1


def test_the_time_part_encodes_the_creation_millisecond() -> None:
    generate = RunIdGenerator()
    early, late = generate(now_ms=1_700_000_000_000), generate(now_ms=1_800_000_000_000)
    assert early < late
    assert (decode_time_ms(early), decode_time_ms(late)) == (1_700_000_000_000, 1_800_000_000_000)


def test_a_clock_step_back_does_not_break_the_order() -> None:
    generate = RunIdGenerator()
    first = generate(now_ms=1_800_000_000_000)
    assert generate(now_ms=1_700_000_000_000) > first


def test_normalise_prefix() -> None:
    assert normalise_prefix(" 01hx7a ") == "01HX7A"
    assert normalise_prefix("01-HX") is None
    assert normalise_prefix("") is None
