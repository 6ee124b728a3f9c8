"""Weekly digest: a Monday-morning cron fans out one event per user; each user's digest is its own run.

The per-user function can also be tried at once:

    meshflow send digest/user.due --data '{"user": "ann"}'
"""

from __future__ import annotations

import meshflow

app = meshflow.App("digest")

USERS = ["ann", "bob", "cy"]


def load_users() -> list[str]:
    return list(USERS)


@app.function("weekly-digest", trigger=meshflow.TriggerCron("TZ=Europe/Paris 0 9 * * MON"))
async def weekly_digest(ctx: meshflow.Context) -> int:
    users = await ctx.step.run("load-users", load_users)
    events = [
        meshflow.Event(name="digest/user.due", data={"user": u, "week": ctx.event.data["tick"]})
        for u in users
    ]
    await ctx.step.send_event("fan-out", events)
    return len(users)


@app.function(
    "user-digest",
    trigger="digest/user.due",
    idempotency="event.data.user + ':' + (has(event.data.week) ? event.data.week : '')",
)
async def user_digest(ctx: meshflow.Context) -> dict[str, str]:
    summary = await ctx.step.run("summarise", lambda: f"3 new things for {ctx.event.data['user']}")
    return {"user": ctx.event.data["user"], "summary": summary}
