"""Step inputs through the client: what each ``step.run`` was given is on its `StepInfo`, also
while it retries; arguments that are not JSON or too large leave a marker, and the step, its run
and other runs go on as ever."""

from __future__ import annotations

import msgspec

import meshflow
from meshflow.server import EmbeddedServer
from meshflow.testing import wait_until


class Order(msgspec.Struct):
    id: str
    qty: int


def steps_of(run: meshflow.Run) -> dict[str, meshflow.StepInfo]:
    return {s.id: s for s in run.steps}


async def test_a_steps_arguments_are_its_input_and_steps_without_any_have_none(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("inp")

    @app.function("ship", trigger="inp/ship")
    async def ship(ctx: meshflow.Context) -> str:
        order = Order(id=ctx.event.data["id"], qty=2)
        label = await ctx.step.run("label", lambda o, express: f"{o.id}:{express}", order, True)
        await ctx.step.run("stamp", lambda: "stamped")
        await ctx.step.sleep("settle", "10ms")
        return str(label)

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="inp/ship", data={"id": "o-1"})
        await client.send(event)
        run = await client.wait_for_run(ship.run_id_for(event), timeout=30)

    assert run.output == "o-1:True"
    steps = steps_of(run)
    assert steps["label"].input == [{"id": "o-1", "qty": 2}, True]
    assert steps["stamp"].input is None
    assert steps["settle"].input is None


async def test_an_argument_that_is_not_json_or_is_over_64_kib_leaves_a_marker_and_the_step_still_runs(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("inp")

    @app.function("odd", trigger="inp/odd", retries=0)
    async def odd(ctx: meshflow.Context) -> list[int]:
        opaque = await ctx.step.run("opaque", lambda thing: len(type(thing).__name__), object())
        big = await ctx.step.run("big", len, "x" * 70_000)
        return [int(opaque), int(big)]

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        events = [meshflow.Event(name="inp/odd") for _ in range(2)]
        await client.send(events)
        runs = [await client.wait_for_run(odd.run_id_for(e), timeout=30) for e in events]

    for run in runs:  # each run is as fine as the other
        assert (run.status, run.output) == (meshflow.RunStatus.COMPLETED, [6, 70_000])
        steps = steps_of(run)
        assert steps["opaque"].input == "<not JSON: TypeError: cannot encode a value of type builtins.object>"
        assert steps["big"].input == "<not stored: 70,004 bytes of JSON, over the 64 KiB limit>"
        assert {s.status for s in run.steps} == {"completed"}


async def test_a_retrying_step_shows_its_input_while_it_waits_and_replays_leave_inputs_as_they_were(
    nats_server: EmbeddedServer, namespace: str, client: meshflow.Client
) -> None:
    app = meshflow.App("inp")
    calls = [0]

    def charge(account: str, cents: int) -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionError("card service down")
        return f"charged {account} {cents}"

    @app.function("pay", trigger="inp/pay", retries=meshflow.Retry(retries=2, backoff=("1500ms",)))
    async def pay(ctx: meshflow.Context) -> str:
        account = await ctx.step.run("account", str.upper, ctx.event.data["who"])
        return str(await ctx.step.run("charge", charge, account, 1250))

    async with meshflow.Worker(app, nats=nats_server.url, namespace=namespace):
        event = meshflow.Event(name="inp/pay", data={"who": "ada"})
        await client.send(event)
        run_id = pay.run_id_for(event)

        async def retrying() -> meshflow.Run | None:
            try:
                run = await client.get_run(run_id)
            except meshflow.RunNotFoundError:
                return None
            step = steps_of(run).get("charge")
            return run if step is not None and step.status == "retrying" else None

        waiting = await wait_until(retrying, timeout=20, message="the charge step waits for its retry")
        assert steps_of(waiting)["charge"].input == ["ADA", 1250]
        as_json = msgspec.to_builtins(waiting)  # what `meshflow run` and the dashboard's API show
        assert [p["input"] for p in as_json["pending"]] == [["ADA", 1250]]
        done = await client.wait_for_run(run_id, timeout=30)

    assert done.output == "charged ADA 1250"
    steps = steps_of(done)
    assert steps["account"].input == ["ada"]  # the pass that retried replayed it: unchanged
    assert (steps["charge"].input, steps["charge"].attempts) == (["ADA", 1250], 2)
