"""Unit tests for meshflow.ids: ULIDs, run ids, step hashes and id validation."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from meshflow.errors import ConfigError
from meshflow.ids import (
    MAX_ULID_TIME_MS,
    ULID_ALPHABET,
    StepCounter,
    is_ulid,
    new_ulid,
    run_id_for,
    step_hash,
    ulid_from,
    ulid_time_ms,
    validate_id,
)


def test_ulid_alphabet_is_crockford_base32() -> None:
    assert ULID_ALPHABET == "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def test_ulid_from_encodes_the_extremes_like_the_ulid_spec() -> None:
    assert ulid_from(0, bytes(10)) == "0" * 26
    assert ulid_from(MAX_ULID_TIME_MS, b"\xff" * 10) == "7" + "Z" * 25


def test_ulid_from_encodes_timestamps_like_other_ulid_libraries() -> None:
    # Published pairs: ulid/javascript encodes 1469918176385 as 01ARYZ6S41, and a README example
    # of another library shows 1698075890563 in 01HDEKBMW3904VB2HYTVWWMSY5.
    assert ulid_from(1_469_918_176_385, bytes(10))[:10] == "01ARYZ6S41"
    assert ulid_from(1_698_075_890_563, bytes(10))[:10] == "01HDEKBMW3"
    assert ulid_time_ms("01HDEKBMW3904VB2HYTVWWMSY5") == 1_698_075_890_563


def test_ulid_from_is_deterministic() -> None:
    entropy = bytes(range(10))
    assert ulid_from(1_700_000_000_000, entropy) == ulid_from(1_700_000_000_000, entropy)
    assert ulid_from(1_700_000_000_000, entropy) != ulid_from(1_700_000_000_000, bytes(range(1, 11)))


def test_ulid_from_puts_the_entropy_in_the_last_sixteen_characters() -> None:
    # 80 bits of entropy is exactly 16 base32 digits, so the timestamp owns the first ten.
    a = ulid_from(123, b"\x00" * 10)
    b = ulid_from(123, b"\xff" * 10)
    assert a[:10] == b[:10]
    assert b[10:] == "Z" * 16


@pytest.mark.parametrize("entropy", [b"", bytes(9), bytes(11)])
def test_ulid_from_rejects_entropy_that_is_not_ten_bytes(entropy: bytes) -> None:
    with pytest.raises(ConfigError, match="10 bytes"):
        ulid_from(0, entropy)


@pytest.mark.parametrize("ts_ms", [-1, MAX_ULID_TIME_MS + 1, True])
def test_ulid_from_rejects_timestamps_outside_48_bits(ts_ms: int) -> None:
    with pytest.raises(ConfigError, match="timestamp") as info:
        ulid_from(ts_ms, bytes(10))
    assert repr(ts_ms) in str(info.value)


def test_new_ulid_embeds_the_given_time_and_is_random() -> None:
    a, b = new_ulid(1_700_000_000_000), new_ulid(1_700_000_000_000)
    assert is_ulid(a)
    assert ulid_time_ms(a) == 1_700_000_000_000
    assert a != b
    assert a[:10] == b[:10]


def test_new_ulid_defaults_to_the_current_time() -> None:
    before = time.time_ns() // 1_000_000
    value = new_ulid()
    after = time.time_ns() // 1_000_000
    assert before <= ulid_time_ms(value) <= after


def test_ulids_sort_by_time_as_strings_across_milliseconds() -> None:
    rng = random.Random(7)
    times = [*sorted(rng.randrange(MAX_ULID_TIME_MS) for _ in range(200)), MAX_ULID_TIME_MS]
    # Adjacent milliseconds with opposite entropy extremes are the hardest case.
    ulids = [ulid_from(t, b"\xff" * 10) for t in times] + [ulid_from(t + 1, bytes(10)) for t in times[:-1]]
    assert [ulid_time_ms(u) for u in sorted(ulids)] == sorted(ulid_time_ms(u) for u in ulids)
    assert ulid_from(1000, b"\xff" * 10) < ulid_from(1001, bytes(10))


def test_ulid_time_ms_inverts_ulid_from() -> None:
    for ts in (0, 1, 1_700_000_000_123, MAX_ULID_TIME_MS):
        assert ulid_time_ms(ulid_from(ts, b"\x5a" * 10)) == ts


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0" * 25,
        "0" * 27,
        "8" + "0" * 25,
        "01arz3ndektsv4rrffq69g5fav",
        "01ARZ3NDEKTSV4RRFFQ69G5FAI",
        "0" * 25 + "U",
    ],
)
def test_is_ulid_rejects_non_canonical_text(value: str) -> None:
    assert not is_ulid(value)
    with pytest.raises(ConfigError, match="invalid ULID") as info:
        ulid_time_ms(value)
    assert repr(value) in str(info.value)


def test_is_ulid_rejects_non_strings() -> None:
    assert not is_ulid(None)  # type: ignore[arg-type]
    assert not is_ulid(b"0" * 26)  # type: ignore[arg-type]


def test_run_id_for_is_deterministic_and_keyed_by_function_and_key() -> None:
    ts = 1_700_000_000_000
    run_id = run_id_for("send-email", "evt-1", ts)
    assert run_id == run_id_for("send-email", "evt-1", ts)
    assert run_id != run_id_for("send-email", "evt-2", ts)
    assert run_id != run_id_for("send-welcome", "evt-1", ts)
    assert is_ulid(run_id)
    assert ulid_time_ms(run_id) == ts


def test_run_id_for_uses_the_sha256_of_function_newline_key_as_entropy() -> None:
    entropy = hashlib.sha256(b"fn\nkey").digest()[:10]
    assert run_id_for("fn", "key", 42) == ulid_from(42, entropy)


def test_run_id_for_separates_function_and_key_unambiguously() -> None:
    assert run_id_for("ab", "c", 0) != run_id_for("a", "bc", 0)


def test_run_id_for_clamps_the_timestamp_to_48_bits() -> None:
    assert ulid_time_ms(run_id_for("f", "k", -5)) == 0
    assert ulid_time_ms(run_id_for("f", "k", 2**60)) == MAX_ULID_TIME_MS


def test_run_ids_sort_by_trigger_time() -> None:
    assert run_id_for("f", "zzz", 1_000) < run_id_for("f", "aaa", 1_001)


def test_step_hash_is_sha1_of_the_id_then_id_colon_n() -> None:
    # Literal digests (from `printf 'a' | sha1sum` and `printf 'a:1' | sha1sum`), as Inngest computes them.
    assert step_hash("a") == "86f7e437faa5a7fce15d1ddcb9eaeaea377667b8"
    assert step_hash("a", 0) == "86f7e437faa5a7fce15d1ddcb9eaeaea377667b8"
    assert step_hash("a", 1) == "de89bfaf06245091a7873290a793604612302247"
    assert step_hash("a", 2) == hashlib.sha1(b"a:2", usedforsecurity=False).hexdigest()


def test_step_hash_encodes_non_ascii_ids_as_utf8() -> None:
    assert step_hash("café") == hashlib.sha1("café".encode(), usedforsecurity=False).hexdigest()


def test_step_counter_hashes_repeats_of_an_id_with_an_increasing_suffix() -> None:
    counter = StepCounter()
    assert counter.next("fetch") == step_hash("fetch")
    assert counter.next("fetch") == step_hash("fetch", 1)
    assert counter.next("fetch") == step_hash("fetch", 2)


def test_step_counter_counts_each_id_separately() -> None:
    counter = StepCounter()
    assert [counter.next(i) for i in ("a", "b", "a", "c", "b", "a")] == [
        step_hash("a"),
        step_hash("b"),
        step_hash("a", 1),
        step_hash("c"),
        step_hash("b", 1),
        step_hash("a", 2),
    ]


def test_step_counters_replay_the_same_hashes_in_the_same_order() -> None:
    ids = ["load", "loop", "loop", "loop", "save"]
    first, second = StepCounter(), StepCounter()
    hashes = [first.next(i) for i in ids]
    assert hashes == [second.next(i) for i in ids]
    assert len(set(hashes)) == len(ids)


@pytest.mark.parametrize("value", ["a", "A", "0", "send-email", "send_email", "Fn-2_x", "9lives", "a" * 64])
def test_validate_id_accepts_subject_safe_ids_and_returns_them(value: str) -> None:
    assert validate_id(value, what="function id") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a.b",
        "a/b",
        "a b",
        "a*",
        "a>",
        "-lead",
        "_lead",
        "a" * 65,
        "café",
        "a\n",
        "a:b",
    ],
)
def test_validate_id_rejects_ids_that_are_not_subject_tokens(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_id(value, what="function id")
    assert str(info.value) == (
        f"invalid function id {value!r}: "
        "use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
    )


def test_validate_id_names_what_was_being_validated() -> None:
    with pytest.raises(ConfigError, match=r"^invalid app id 'my\.app': "):
        validate_id("my.app", what="app id")


def test_validate_id_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="invalid function id 42"):
        validate_id(42, what="function id")  # type: ignore[arg-type]
