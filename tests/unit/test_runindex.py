"""The runs index's pure parts: reading an entry's subject, and sizing the next read."""

from __future__ import annotations

from meshflow.names import Names
from meshflow.runindex import Entry, next_window, parse_entry

names = Names("mf")


def test_entries_are_read_back_from_the_subjects_they_are_written_on() -> None:
    new = names.index_new_subject("shop-charge", "01RUN")
    end = names.index_end_subject("failed", "shop-charge", "01RUN")
    live = names.live_subject("sleeping", "shop-charge", "01RUN")
    assert parse_entry(names, 7, new, b"1700", 1800) == Entry(
        "new", 7, new, "01RUN", "shop-charge", None, 1700, 1800
    )
    assert parse_entry(names, 8, end, b"1700", 1800) == Entry(
        "end", 8, end, "01RUN", "shop-charge", "failed", 1700, 1800
    )
    assert parse_entry(names, 9, live, b"1700", 1800) == Entry(
        "live", 9, live, "01RUN", "shop-charge", "sleeping", 1700, 1800
    )


def test_what_is_not_an_entry_is_skipped() -> None:
    assert parse_entry(names, 1, names.index_ready_subject, b"1", 0) is None
    assert parse_entry(names, 1, names.index_new_subject("f", "r"), b"not a time", 0) is None
    assert parse_entry(names, 1, "mf.idx.other.f.r", b"1", 0) is None


def test_filters_match_the_subjects_of_their_entries() -> None:
    assert names.index_end_filter("failed", None) == "mf.idx.end.failed.*.*"
    assert names.live_filter(None, "a-f", "r1") == "mf.live.*.a-f.r1"
    assert names.live_filter("waiting", None) == "mf.live.waiting.*.*"
    assert names.index_new_filter("a-f") == "mf.idx.new.a-f.*"


def test_the_next_read_is_sized_by_the_density_seen_so_far() -> None:
    assert next_window(100, 100, 0, 50) == 800  # nothing found yet: much further back
    assert next_window(100, 100, 100, 50) == 200  # dense: at least twice as far
    assert next_window(1000, 10_000, 10, 40) == 16_000  # sparse: at most sixteen times
    assert next_window(1000, 1000, 10, 40) == 5000  # 1 in 100: 40 more need about 4,000, plus a quarter
