"""Expense approval: wait up to 3 days for a manager's decision on this expense, then act on it.

meshflow send expense/submitted --data '{"expense_id": "e-1", "amount": 420}'
meshflow send expense/decided --data '{"expense_id": "e-1", "approved": true, "by": "ann"}'
"""

from __future__ import annotations

from typing import Any

import meshflow

app = meshflow.App("finance")


async def pay_out(expense: dict[str, Any]) -> dict[str, Any]:
    return {"paid": expense["amount"], "expense_id": expense["expense_id"]}


@app.function(
    "approve-expense",
    trigger=meshflow.TriggerEvent("expense/submitted", if_="event.data.amount > 0"),
    cancel_on=[meshflow.Cancel(event="expense/withdrawn", match="data.expense_id")],
)
async def approve_expense(ctx: meshflow.Context) -> dict[str, Any]:
    decision = await ctx.step.wait_for_event(
        "manager-decision", event="expense/decided", match="data.expense_id", timeout="3d"
    )
    if decision is None:
        return {"status": "expired"}
    ctx.logger.info("approved" if decision.data.get("approved") else "rejected", by=decision.data.get("by"))
    if not decision.data.get("approved"):
        return {"status": "rejected", "by": decision.data.get("by")}
    payment = await ctx.step.run("pay-out", pay_out, ctx.event.data)
    await ctx.step.send_event(
        "notify", meshflow.Event(name="expense/paid", data={**payment, "by": decision.data.get("by")})
    )
    return {"status": "paid", **payment}
