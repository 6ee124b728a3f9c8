"""Unit tests for meshflow.expressions: CEL filters, conditions and keys, and match paths."""

from __future__ import annotations

import re
from typing import Any

import pytest

from meshflow.errors import ConfigError, MeshflowError
from meshflow.expressions import (
    MAX_EXPRESSION_LENGTH,
    ExpressionError,
    compile_expression,
    compile_match,
    lookup,
    match_key,
)

WHAT = "function 'approve': if_"


def event(**data: Any) -> dict[str, Any]:
    return {"name": "order/created", "data": data, "id": "01J00000000000000000000000", "ts": 1}


# --- the three uses ---------------------------------------------------------------------------


def test_trigger_filter_passes_only_events_that_satisfy_it() -> None:
    expr = compile_expression("event.data.total > 100", variables=["event"], what=WHAT)

    assert expr.test({"event": event(total=150)})
    assert expr.test({"event": event(total=100.5)})  # int and double compare without a cast
    assert not expr.test({"event": event(total=100)})


def test_wait_condition_sees_the_trigger_event_and_the_candidate() -> None:
    expr = compile_expression(
        "event.data.userId == async.data.userId && async.data.amount > 100",
        variables=["event", "async"],
        what="function 'approve': wait_for_event 'payment' if_",
    )
    trigger = event(userId="u1")

    assert expr.test({"event": trigger, "async": event(userId="u1", amount=250)})
    assert not expr.test({"event": trigger, "async": event(userId="u2", amount=250)})
    assert not expr.test({"event": trigger, "async": event(userId="u1", amount=50)})


def test_idempotency_key_evaluates_to_the_field_value() -> None:
    expr = compile_expression("event.data.userId", variables=["event"], what="function 'a': idempotency")

    assert expr.evaluate({"event": event(userId="u1")}) == "u1"
    assert expr.evaluate({"event": event(userId=7)}) == 7


def test_evaluate_returns_plain_json_values() -> None:
    expr = compile_expression("event.data", variables=["event"], what=WHAT)
    data = {"a": [1, 2.5, None, True, {"b": "c"}]}

    assert expr.evaluate({"event": event(**data)}) == data


def test_expressions_may_use_comprehension_variables() -> None:
    expr = compile_expression("event.data.items.exists(i, i.price > 100)", variables=["event"], what=WHAT)

    assert expr.test({"event": event(items=[{"price": 5}, {"price": 500}])})
    assert not expr.test({"event": event(items=[{"price": 5}])})


def test_has_guards_an_optional_field() -> None:
    expr = compile_expression("has(event.data.vip) && event.data.vip", variables=["event"], what=WHAT)

    assert expr.test({"event": event(vip=True)})
    assert not expr.test({"event": event()})


def test_expression_keeps_its_source_and_compares_by_it() -> None:
    one = compile_expression("event.data.x == 1", variables=["event"], what=WHAT)
    two = compile_expression("event.data.x == 1", variables=["event"], what=WHAT)

    assert one.source == "event.data.x == 1"
    assert one == two
    assert "event.data.x == 1" in repr(one)


# --- evaluation failures ----------------------------------------------------------------------


def test_test_is_false_when_a_field_is_missing() -> None:
    expr = compile_expression("event.data.total > 100", variables=["event"], what=WHAT)

    assert expr.test({"event": event()}) is False


def test_test_is_false_when_the_result_is_not_a_bool() -> None:
    expr = compile_expression("event.data.total", variables=["event"], what=WHAT)

    assert expr.test({"event": event(total=1)}) is False
    assert expr.test({"event": event(total="true")}) is False


@pytest.mark.parametrize(
    ("source", "data"),
    [
        ("event.data.total > 100", {"total": "lots"}),  # no coercion between string and int
        ("event.data.total + 1 > 2", {"total": 1.5}),  # nor in arithmetic between double and int
        ("event.data.n / 0 == 1", {"n": 1}),
        ("event.data.s.matches('(')", {"s": "x"}),
    ],
)
def test_test_is_false_on_any_evaluation_error(source: str, data: dict[str, Any]) -> None:
    assert compile_expression(source, variables=["event"], what=WHAT).test({"event": event(**data)}) is False


def test_evaluate_names_the_expression_and_the_missing_field() -> None:
    expr = compile_expression("event.data.userId", variables=["event"], what=WHAT)

    with pytest.raises(ExpressionError, match=r"'event\.data\.userId' failed: no field or key 'userId'"):
        expr.evaluate({"event": event()})


def test_evaluate_raises_expression_error_on_a_type_mismatch() -> None:
    expr = compile_expression("event.data.total > 100", variables=["event"], what=WHAT)

    with pytest.raises(ExpressionError, match="total > 100") as info:
        expr.evaluate({"event": event(total="lots")})
    assert isinstance(info.value, MeshflowError)


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("b'abc'", "bytes"),
        ("timestamp('2026-01-01T00:00:00Z')", "timestamp"),
        ("[duration('1s')]", "duration"),
    ],
)
def test_evaluate_refuses_results_without_a_json_form(source: str, kind: str) -> None:
    expr = compile_expression(source, variables=["event"], what=WHAT)

    with pytest.raises(ExpressionError, match=f"returned a {kind} value"):
        expr.evaluate({"event": event()})


def test_evaluate_refuses_a_map_with_non_string_keys() -> None:
    with pytest.raises(ExpressionError, match="non-string keys"):
        compile_expression("{1: 'a'}", variables=["event"], what=WHAT).evaluate({"event": event()})


# --- compile-time checks ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["", "   "])
def test_an_empty_expression_is_a_config_error(source: str) -> None:
    with pytest.raises(ConfigError, match=r"^function 'approve': if_ expression is empty: write a CEL"):
        compile_expression(source, variables=["event"], what=WHAT)


@pytest.mark.parametrize("source", [None, 100, b"event.data.x", True])
def test_a_non_string_expression_is_a_config_error(source: object) -> None:
    with pytest.raises(ConfigError, match=r"^function 'approve': if_ expression must be a string of CEL"):
        compile_expression(source, variables=["event"], what=WHAT)


def test_an_expression_over_the_length_limit_is_a_config_error() -> None:
    source = "event.data.x == '" + "a" * MAX_EXPRESSION_LENGTH + "'"

    with pytest.raises(ConfigError, match=r"^function 'approve': if_ .* the limit is 4096: move the logic"):
        compile_expression(source, variables=["event"], what=WHAT)


def test_an_expression_at_the_length_limit_compiles() -> None:
    source = "event.data.x == '" + "a" * (MAX_EXPRESSION_LENGTH - 18) + "'"
    assert len(source) == MAX_EXPRESSION_LENGTH

    assert compile_expression(source, variables=["event"], what=WHAT).source == source


@pytest.mark.parametrize("source", ["event.data.", "event.data.total >", "(event", "event = 1", "'open"])
def test_a_syntax_error_is_a_config_error_naming_the_place(source: str) -> None:
    with pytest.raises(ConfigError, match=r"^function 'approve': if_ expression .* is invalid at line 1"):
        compile_expression(source, variables=["event"], what=WHAT)


def test_a_syntax_error_message_quotes_the_expression() -> None:
    with pytest.raises(ConfigError) as info:
        compile_expression("event.data.", variables=["event"], what=WHAT)

    assert str(info.value).startswith("function 'approve': if_ expression 'event.data.' is invalid at line 1")


def test_an_unknown_variable_is_a_config_error_listing_the_allowed_ones() -> None:
    expected = r"unknown variable\(s\) evnt: use only the variables event, async$"
    with pytest.raises(ConfigError, match=expected):
        compile_expression("evnt.data.x == async.data.x", variables=["event", "async"], what=WHAT)


def test_async_is_unknown_to_a_trigger_filter() -> None:
    with pytest.raises(ConfigError, match=r"unknown variable\(s\) async: use only the variables event$"):
        compile_expression("async.data.x == 1", variables=["event"], what=WHAT)


@pytest.mark.parametrize(
    "source",
    [
        "(" * 2000 + "1" + ")" * 2000,
        "[" * 2000 + "]" * 2000,
        "size(" * 600 + "'a'" + ")" * 600,
        "{'a':" * 600 + "1" + "}" * 600,
        "!(" * 1000 + "true" + ")" * 1000,
    ],
)
def test_pathological_nesting_is_a_config_error(source: str) -> None:
    assert len(source) <= MAX_EXPRESSION_LENGTH
    with pytest.raises(ConfigError, match=r"^function 'approve': if_ expression .* nested too deeply"):
        compile_expression(source, variables=[], what=WHAT)


def test_nesting_past_the_length_limit_is_refused_before_parsing() -> None:
    with pytest.raises(ConfigError, match="is 10001 characters long; the limit is 4096"):
        compile_expression("(" * 5000 + "1" + ")" * 5000, variables=[], what=WHAT)


def test_nesting_just_under_the_parser_limit_compiles() -> None:
    source = "(" * 90 + "1" + ")" * 90

    assert compile_expression(source, variables=[], what=WHAT).evaluate({}) == 1


def test_a_long_flat_expression_compiles() -> None:
    source = "event.data.x in [" + ",".join(str(n) for n in range(800)) + "]"

    assert compile_expression(source, variables=["event"], what=WHAT).test({"event": event(x=799)})


# --- match paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("data.userId", ("data", "userId")),
        ("data.user.id", ("data", "user", "id")),
        ("data.user-id", ("data", "user-id")),
        ("data._x9", ("data", "_x9")),
    ],
)
def test_compile_match_splits_a_path_under_data(path: str, segments: tuple[str, ...]) -> None:
    assert compile_match(path, what="wait") == segments


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (None, "must be a string"),
        (["data", "x"], "must be a string"),
        ("", "is empty"),
        ("data." + "x" * 256, "longer than 256"),
        ("userId", "does not name a field under data"),
        ("data", "does not name a field under data"),
        ("name", "does not name a field under data"),
        ("data..x", "invalid part ''"),
        ("data.x.", "invalid part ''"),
        ("data.user id", "invalid part 'user id'"),
        ("data.1st", "invalid part '1st'"),
        ("data.é", "invalid part 'é'"),
        ("data[0]", "invalid part 'data\\[0\\]'"),
    ],
)
def test_compile_match_refuses_bad_paths(path: object, reason: str) -> None:
    expected = rf"^function 'a': wait_for_event 'pay' match .*{reason}.*like 'data\.userId'"
    with pytest.raises(ConfigError, match=expected):
        compile_match(path, what="function 'a': wait_for_event 'pay'")


def test_lookup_walks_nested_mappings() -> None:
    evt = event(user={"id": "u1", "tags": ["a"]}, empty=None)

    assert lookup(evt, ("data", "user", "id")) == (True, "u1")
    assert lookup(evt, ("data", "user", "tags")) == (True, ["a"])
    assert lookup(evt, ("data", "empty")) == (True, None)


@pytest.mark.parametrize(
    "path",
    [("data", "missing"), ("data", "user", "id", "deeper"), ("data", "user", "tags", "0"), ("nope",)],
)
def test_lookup_reports_a_path_that_breaks_off(path: tuple[str, ...]) -> None:
    evt = event(user={"id": "u1", "tags": ["a"]})

    assert lookup(evt, path) == (False, None)


# --- match keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "two"),
    [
        (1, 1.0),
        (0, -0.0),
        ("u1", "u1"),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ([1, {"x": 2.0}], [1.0, {"x": 2}]),
        ((1, 2), [1, 2]),
    ],
)
def test_match_key_is_equal_for_equal_json_values(one: Any, two: Any) -> None:
    assert match_key(one) == match_key(two)


@pytest.mark.parametrize(
    ("one", "two"),
    [
        (True, 1),
        (False, 0),
        (1, "1"),
        (None, "null"),
        (1.5, 1),
        ([1, 2], [2, 1]),
        ({"a": 1}, {"a": "1"}),
        (2**53 + 1, float(2**53)),  # equal in CEL (through a double), not as exact numbers
    ],
)
def test_match_key_differs_for_different_values(one: Any, two: Any) -> None:
    assert match_key(one) != match_key(two)


def test_match_key_is_32_hex_digits_and_stable() -> None:
    key = match_key({"userId": "u1"})

    assert len(key) == 32
    assert re.fullmatch(r"[0-9a-f]{32}", key), key
    assert key == match_key({"userId": "u1"})
