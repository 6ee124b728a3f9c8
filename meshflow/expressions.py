"""Expressions: the CEL conditions and keys users write in function config, and match paths.

Three options take a CEL (Common Expression Language) expression, each with its own bindings:

- a trigger filter, `if_="event.data.total > 100"`: `event` is the incoming event;
- a `wait_for_event` condition, `if_="event.data.userId == async.data.userId"`: `event` is the
  run's trigger event and `async` the candidate event;
- an idempotency key, `idempotency="event.data.userId"`: `event` is the incoming event, and the
  value (not just true or false) is the key.

Every event binds as a map `{name, data, id, ts}`. A `wait_for_event` match is a dotted path
instead (`"data.userId"`), compared for equality between the two events; `compile_match` checks
it, `lookup` reads it and `match_key` hashes the value so waiters can be indexed by it.

Invariants:

- An expression is checked once, when the function is registered: a string of 1 to
  `MAX_EXPRESSION_LENGTH` characters that parses (the parser refuses nesting deeper than 96
  levels) and uses only the variables its option binds. Any problem is a `ConfigError` whose
  message starts with the caller's `what` and says how to fix it.
- Evaluation runs no Python: `cel` evaluates in Rust and no Python function is registered with
  it. `evaluate` raises `ExpressionError` for every failure (a missing field, mixing types,
  dividing by zero, an unknown function, a result that is not JSON); `Expression.test` turns any
  failure, and any result but `true`, into False. Function names are not checked at compile time,
  so a typo like `startswith` shows only as a filter that never passes.
- CEL does not coerce: `1 == 1.0` and `1 < 1.5` hold, but `1 + 1.5` is an error, and reading a
  field that is absent is an error, not null; guard optional fields with `has(event.data.x)`.
- Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cel

from meshflow.errors import ConfigError, ExpressionError

__all__ = [
    "MAX_EXPRESSION_LENGTH",
    "Expression",
    "ExpressionError",
    "compile_expression",
    "compile_match",
    "lookup",
    "match_key",
]

MAX_EXPRESSION_LENGTH = 4096
_MAX_MATCH_LENGTH = 256
_SHOWN = 80  # characters of an expression quoted in a message; the rest is elided

# `Program.variables()` also lists the names comprehension macros bind (`x` in
# `items.exists(x, x > 1)`); these are not free variables, so they must not be refused. A string
# literal that looks like a macro can only let a name through here to fail at evaluation.
_MACRO_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_PARSE_ERROR = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_INNER_MSG = re.compile(r'msg: "([^"]*)"')
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# Python types of cel results that are not JSON, by the names CEL users know them by.
_CEL_TYPES = {"datetime": "timestamp", "timedelta": "duration", "OptionalValue": "optional"}
_MATCH_HINT = "use a dotted path to a field of the event's data, like 'data.userId'"


@dataclass(frozen=True, slots=True)
class Expression:
    """A checked, compiled CEL expression; make one with `compile_expression`.

    Attributes:
        source: the expression as the user wrote it.
    """

    source: str
    _program: cel.Program = field(repr=False, compare=False)

    def evaluate(self, bindings: Mapping[str, Any]) -> Any:
        """Evaluate the expression and return its value as plain JSON-shaped Python.

        Args:
            bindings: the variables, like `{"event": {...}}`.

        Returns:
            A str, int, float, bool, None, or a list or str-keyed dict of those.

        Raises:
            ExpressionError: evaluation failed, or the result is not a JSON value.
        """
        try:
            result = self._program.execute(dict(bindings))
        # cel raises KeyError, TypeError, ValueError, RuntimeError, IndexError and ArithmeticError
        # subclasses; all of them mean the same thing here.
        except Exception as exc:
            raise ExpressionError(f"expression {_shown(self.source)} failed: {_eval_cause(exc)}") from exc
        return _plain(result, self.source)

    def test(self, bindings: Mapping[str, Any]) -> bool:
        """True only when the expression evaluates to `true`; errors and other values are False."""
        try:
            return self.evaluate(bindings) is True
        except ExpressionError:
            return False


def compile_expression(source: object, *, variables: Collection[str], what: str) -> Expression:
    """Check and compile a CEL expression from a function's config.

    Args:
        source: what the user wrote.
        variables: the top-level variables the expression may use, like `("event", "async")`.
        what: the option, named at the start of error messages, like `"function 'approve': if_"`.

    Returns:
        The compiled expression.

    Raises:
        ConfigError: `source` is not a string, is empty or too long, does not parse, or uses
            a variable not in `variables`.
    """
    names = ", ".join(dict.fromkeys(variables))
    if not isinstance(source, str):
        raise ConfigError(f"{what} expression must be a string of CEL; got a {type(source).__name__}")
    if not source.strip():
        raise ConfigError(f"{what} expression is empty: write a CEL expression over {names}, or leave it out")
    if len(source) > MAX_EXPRESSION_LENGTH:
        raise ConfigError(
            f"{what} expression {_shown(source)} is {len(source)} characters long; the limit is "
            f"{MAX_EXPRESSION_LENGTH}: move the logic into the function"
        )
    try:
        # Imported on first use: the `cel` package also imports its command line (prompt_toolkit,
        # rich), about 10 MB and 0.1 s that workers whose functions use no expression never pay.
        import cel

        program = cel.compile(source)
    # The parser reports syntax errors and too-deep nesting as ValueError; anything else it might
    # raise on odd input means the same to the user.
    except Exception as exc:
        cause = _parse_cause(source, exc)
        raise ConfigError(f"{what} expression {_shown(source)} is invalid {cause}") from None
    unknown = set(program.variables()) - set(variables) - set(_MACRO_BOUND.findall(source))
    if unknown:
        raise ConfigError(
            f"{what} expression {_shown(source)} uses unknown variable(s) {', '.join(sorted(unknown))}: "
            f"use only the variables {names}"
        )
    return Expression(source, program)


def compile_match(path: object, *, what: str) -> tuple[str, ...]:
    """Check a `wait_for_event` match path like `"data.userId"` and split it into segments.

    Args:
        path: what the user wrote.
        what: the option, named at the start of error messages.

    Returns:
        The segments, like `("data", "userId")`.

    Raises:
        ConfigError: `path` is not a string, is empty or too long, has a segment that is not an
            identifier, or does not name a field under `data`.
    """
    if not isinstance(path, str):
        raise ConfigError(f"{what} match must be a string; got a {type(path).__name__}: {_MATCH_HINT}")
    if not path:
        raise ConfigError(f"{what} match path is empty: {_MATCH_HINT}")
    if len(path) > _MAX_MATCH_LENGTH:
        raise ConfigError(f"{what} match path is longer than {_MAX_MATCH_LENGTH} characters: {_MATCH_HINT}")
    segments = tuple(path.split("."))
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise ConfigError(f"{what} match path {path!r} has an invalid part {segment!r}: {_MATCH_HINT}")
    if segments[0] != "data" or len(segments) < 2:
        raise ConfigError(f"{what} match path {path!r} does not name a field under data: {_MATCH_HINT}")
    return segments


def lookup(obj: Mapping[str, Any], path: Sequence[str]) -> tuple[bool, Any]:
    """Follow `path` through nested mappings: `(True, value)`, or `(False, None)` if it breaks off."""
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return False, None
        current = current[key]
    return True, current


def match_key(value: Any) -> str:
    """A stable 32-hex-digit hash of a JSON value, to index waiters by the value they match.

    Values that are equal as JSON get the same key: map key order does not matter, and an
    integral float is the same number as the int (`1.0` and `1`, `-0.0` and `0`). Booleans stay
    distinct from numbers (`true` is not `1`), as in JSON and CEL.

    Args:
        value: a JSON value, such as `lookup` or `Expression.evaluate` returns.

    Returns:
        The first 32 hex digits of the sha1 of the value's canonical JSON.

    Raises:
        TypeError: `value` is not a JSON value.
    """
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:32]


def _canonical(value: Any) -> Any:
    # bool is not a float, so True never becomes 1 here.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _canonical(item) for key, item in value.items()}
    return value


def _shown(source: str) -> str:
    return repr(source) if len(source) <= _SHOWN else repr(source[:_SHOWN]) + "..."


def _parse_cause(source: str, exc: Exception) -> str:
    # cel's message echoes the whole source, then one "ERROR: <input>:line:col: msg" per problem,
    # each followed by a caret drawing; the first problem is the one worth reading.
    text = str(exc).removeprefix(f"Failed to parse expression '{source}': ")
    first = text.splitlines()[0] if text else type(exc).__name__
    found = _PARSE_ERROR.fullmatch(first)
    if found is None:
        return f"({first})"
    line, column, msg = found.groups()
    inner = _INNER_MSG.search(msg)  # errors wrapped as `OtherError(ParseError { msg: "..." })`
    if inner is not None:
        msg = inner.group(1)
    if "Recursion limit" in msg:
        msg = f"it is nested too deeply ({msg}); flatten it"
    return f"at line {line}, column {column}: {msg}"


def _eval_cause(exc: Exception) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return f"no field or key {exc.args[0]!r}; guard optional fields with has(...)"
    return str(exc) or type(exc).__name__


def _plain(value: Any, source: str) -> Any:
    # cel also returns bytes, datetime, timedelta and OptionalValue; none has one JSON form.
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, list):
        return [_plain(item, source) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ExpressionError(f"expression {_shown(source)} returned a map with non-string keys")
        return {key: _plain(item, source) for key, item in value.items()}
    kind = _CEL_TYPES.get(type(value).__name__, type(value).__name__)
    raise ExpressionError(
        f"expression {_shown(source)} returned a {kind} value, which has no JSON form; "
        "convert it, for example with string(...)"
    )
