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


FUNCTIONS = {fn.id: fn for fn in app.functions}
