"""Reading what a report shows through the ``WorldService`` facade (read-only calls only)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from qmtl_core.report._assemble import Report, assemble

if TYPE_CHECKING:
    from qmtl_core.service import WorldService


def collect(service: "WorldService", world: str, *, strategy: str | None = None, at: datetime | None = None,
            top: int = 10) -> Report:
    """The report of ``world`` now (or as of ``at``), for every strategy or only ``strategy``.

    Raises ``WorldNotFound`` (exit 3) for an unknown world and ``StrategyNotFound`` (exit 3) for a
    strategy the world does not know (or did not know yet at ``at``).
    """
    from qmtl_core.errors import StrategyNotFound

    policy = service.load_world(world, record=False).policy
    runs = service.list_runs(world, strategy_id=strategy, history=at is not None)
    returns = service.run_returns(world, strategy_id=strategy, latest_per_stage=True, at=at)
    views = [v.to_dict() for v in service.campaign(world, strategy_id=strategy)] if at is None else None
    activations = service.activations(world) if at is None else None
    history = service.history(world, at=at)
    requests = service.promotion_requests(world=world, include_closed=at is not None)
    report = assemble(world=world, policy=policy, runs=runs, returns=returns, views=views,
                      activations=activations, history=history, requests=requests, at=at,
                      now=service.clock(), top=top, only=strategy)
    if at is None:  # the approver's view is of now: the gate as a dry run, the current snapshot
        from qmtl_core.service._client import LocalClient

        reader = LocalClient(service)
        report.approvals = {p["request_id"]: reader.approval_view(p["request_id"]) for p in report.pending}
    if strategy is not None and not report.strategies:
        raise StrategyNotFound(f"strategy {strategy!r} had no runs in world {world} at {report.at}",
                               hint="pick a later --at, or see qmtl world runs W --strategy S --history")
    return report
