"""Signup onboarding: create the account, welcome mail, wait three days, onboarding mail."""

from __future__ import annotations

import meshflow

app = meshflow.App("shop")


def create_account(email: str) -> dict[str, str]:
    return {"id": f"acc-{abs(hash(email)) % 10_000}", "email": email}


async def send_mail(kind: str, account: dict[str, str]) -> dict[str, str]:
    return {"sent": kind, "to": account["email"]}


@app.function("process-signup", trigger="user/signup", retries=3)
async def process_signup(ctx: meshflow.Context) -> dict[str, str]:
    account = await ctx.step.run("create-account", create_account, ctx.event.data["email"])
    await ctx.step.run("send-welcome", send_mail, "welcome", account)
    await ctx.step.sleep("wait-for-onboarding", "3 days")
    await ctx.step.run("send-onboarding", send_mail, "onboarding", account)
    return {"account": account["id"]}


@app.function("audit-user-events", trigger="user/*")
async def audit(ctx: meshflow.Context) -> str:
    ctx.logger.info("user event", name=ctx.event.name)
    return ctx.event.name
