"""``invoke``: the pending item of a step that runs another function as a child run, built and
checked without I/O (the engine parks on it; ``meshflow.lifecycle`` starts the child and resolves
the step when the child ends).

The child's run id derives from the parent run and the step, so a pass re-executed after a crash
finds the same child instead of starting a second one.
"""

from __future__ import annotations

import msgspec

from .codec import encode_value
from .durations import parse_duration, to_ms
from .errors import ConfigError
from .functions import Function
from .ids import run_id_for, validate_id
from .runs import NEVER, InvokeSpec, Pending, PendingKind


def invoke_item(
    key: str,
    step_id: str,
    *,
    function: object,
    data: object,
    timeout: object,
    run_id: str,
    created_at: int,
    now: int,
) -> Pending:
    """What step ``step_id`` (hash ``key``) of run ``run_id`` waits for: the end of a child run of
    ``function`` (a `Function` or a full id like ``"app-fn"``) with ``data`` as its event data,
    until ``timeout`` (None: no deadline). Raises `ConfigError` naming the step for bad input."""
    what = f"step {step_id!r}"
    if isinstance(function, Function):
        target = function.full_id
    elif isinstance(function, str) and function:
        target = validate_id(function, what=f"{what} function")
    else:
        raise ConfigError(f"{what}: function must be a Function or a full function id like 'app-fn'")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: data must be a dict (the invoked run's event data)")
    data = dict(msgspec.json.decode(encode_value(data, what=f"{what} data")))
    until = NEVER
    if timeout is not None:
        until = now + to_ms(parse_duration(timeout, what=f"{what} timeout"))  # type: ignore[arg-type]
    child = run_id_for(target, f"{run_id}:{key}", created_at)
    spec = InvokeSpec(function=target, run_id=child, data=data)
    return Pending(kind=PendingKind.INVOKE, key=key, step_id=step_id, until=until, since=now, invoke=spec)
