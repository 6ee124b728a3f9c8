"""The functions whose recorded run histories (``histories/*.json``) must keep replaying.

Never change a function here in a way that changes its steps: recorded histories stand for runs
already in flight when a new meshflow version is deployed. Add new functions instead.
"""

from __future__ import annotations

import asyncio

import meshflow

app = meshflow.App("histories")


def create_account(email: str) -> dict[str, str]:
    return {"id": "acc-1", "email": email}


def send_mail(kind: str, account: dict[str, str]) -> dict[str, str]:
    return {"sent": kind, "to": account["email"]}


@app.function("signup", trigger="user/signup")
async def signup(ctx: meshflow.Context) -> dict[str, str]:
    account = await ctx.step.run("create-account", create_account, ctx.event.data["email"])
    await ctx.step.run("send-welcome", send_mail, "welcome", account)
    await ctx.step.sleep("wait-for-onboarding", "3 days")
    await ctx.step.run("send-onboarding", send_mail, "onboarding", account)
    return {"account": account["id"]}


@app.function("loop", trigger="batch/go")
async def loop(ctx: meshflow.Context) -> list[int]:
    return [await ctx.step.run("square", lambda i=i: i * i) for i in range(5)]


@app.function(
    "flaky", trigger="flaky/go", retries=meshflow.Retry(retries=3, backoff=("1s", "2s"), jitter=0.0)
)
async def flaky(ctx: meshflow.Context) -> str:
    return str(await ctx.step.run("call", lambda: "ok"))


@app.function("fallback", trigger="pay/go")
async def fallback(ctx: meshflow.Context) -> str:
    try:
        await ctx.step.run("charge", lambda: "charged")
    except meshflow.StepError as exc:
        reason = exc.error_type
        return str(await ctx.step.run("queue-for-later", lambda: f"queued after {reason}"))
    return "charged"


@app.function("fan", trigger="fan/go")
async def fan(ctx: meshflow.Context) -> list[str]:
    a, b = await asyncio.gather(ctx.step.run("left", lambda: "L"), ctx.step.run("right", lambda: "R"))
    await ctx.step.sleep("pause", "10s")
    return [a, b]


def file_request(data: dict[str, object]) -> dict[str, object]:
    return {"request": data["requestId"], "amount": data["amount"]}


@app.function("approval", trigger="expense/submitted")
async def approval(ctx: meshflow.Context) -> dict[str, object]:
    request = await ctx.step.run("file-request", file_request, ctx.event.data)
    decision = await ctx.step.wait_for_event(
        "await-decision", event="expense/decided", match="data.requestId", timeout="2 days"
    )
    if decision is None:
        return {"escalated": await ctx.step.run("escalate", lambda: f"escalated {request['request']}")}
    approved = bool(decision.data["approved"])
    await ctx.step.run("record-decision", lambda: {"request": request["request"], "approved": approved})
    return {"approved": approved, "by": decision.data["by"]}


@app.function("order-outcome", trigger="shop/order.placed")
async def order_outcome(ctx: meshflow.Context) -> str:
    event = await ctx.step.wait_for_any(
        "outcome",
        [
            meshflow.WaitFor("shop/order.paid", match="data.orderId", if_="async.data.amount > 0"),
            meshflow.WaitFor("shop/order.cancelled", match="data.orderId"),
        ],
        timeout="7 days",
    )
    return "expired" if event is None else event.name


@app.function("charge-card", trigger="billing/charge")
async def charge_card(ctx: meshflow.Context) -> dict[str, object]:
    return {"charged": ctx.event.data["amount"]}


@app.function("checkout", trigger="shop/checkout")
async def checkout(ctx: meshflow.Context) -> dict[str, object]:
    try:
        receipt = await ctx.step.invoke(
            "charge", function=charge_card, data={"amount": ctx.event.data["amount"]}, timeout="1 hour"
        )
    except meshflow.StepError as exc:
        return {"paid": False, "reason": f"{exc.error_type}: {exc.error_message}"}
    return {"paid": True, "receipt": receipt}


@app.function("notify", trigger="shop/order.shipped")
async def notify(ctx: meshflow.Context) -> dict[str, object]:
    mail = meshflow.Event(
        name="mail/requested", id=f"{ctx.run_id}:mail", data={"to": ctx.event.data["email"]}, ts=ctx.event.ts
    )
    ids = await ctx.step.send_event("request-mail", [mail])
    await ctx.step.run("mark-notified", lambda: "notified")
    return {"sent": ids}


FUNCTIONS = {fn.id: fn for fn in app.functions}
