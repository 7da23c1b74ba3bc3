"""May this job start? Price its time limit as the charger would price its use, then hold that
much of its account's money under the account's (or system's, or site's) policy:

| policy | the hold fits within available + credit limit | it does not |
|---|---|---|
| reject | held; the job starts | nothing held; the job does not start |
| allow  | held; the job starts | what fits is held; the job starts |
| notify | held; the job starts | all of it is held, past the credit limit; the job starts |

A job that would take its user past the spending limit their PI set for them in the project
(shared/member_limits.py) is refused under reject, and started under allow and notify with the
reason logged, as a job its account cannot cover.

The hold is the ledger's, keyed by the job's run (system, job id, array task, submit time, restart
count), so a prolog run twice holds once. The job's charge at its end releases it (the charger,
in the same transaction); a job that never reports back has its hold expire ``hold_grace`` after
its time limit.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import ledger, member_limits
from shared.config import Settings
from shared.errors import InsufficientFunds
from shared.jobs import upsert_jobs
from shared.member_limits import MemberUse
from shared.models import Account, Job, LedgerTransaction, MemberLimit, System
from shared.money import money_str
from shared.rating.directory import Directory, Unresolved
from shared.rating.jobs import REFUSED
from shared.rating.quote import Quote, quote

log = logging.getLogger("openacct.admission")

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0, le=10_000_000, strict=True)]


class AdmissionRequest(BaseModel):
    """What the prolog knows of a job about to start (from Slurm's environment and scontrol)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: Name
    job_id: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")]
    array_job_id: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")] | None = None
    array_task_id: Count | None = None
    submit_time: AwareDatetime
    start_time: AwareDatetime
    restart_count: Count = 0
    user: Name
    account: Name | None = None
    partition: Name | None = None
    qos: Name | None = None
    cpus: Count = 0
    gpus: Count = 0
    nodes: Count = 0
    node_list: Annotated[str, StringConstraints(max_length=65536)] | None = None
    time_limit_minutes: Annotated[int, Field(ge=1, le=400 * 24 * 60, strict=True)] | None = None
    # Epoch milliseconds after which the prolog no longer waits (it decided by itself): a
    # decision later than that is not committed.
    answer_by_ms: Annotated[int, Field(gt=0, strict=True)] | None = None

    @property
    def run_key(self) -> str:
        task = "" if self.array_task_id is None else f"_{self.array_task_id}"
        return f"{self.system}/{self.job_id}{task}/{int(self.submit_time.timestamp())}/{self.restart_count}"


@dataclass(frozen=True)
class Decision:
    admit: bool
    policy: str
    reason: str
    cost: Decimal | None = None
    held: Decimal = Decimal(0)
    hold_id: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"admit": self.admit, "policy": self.policy, "reason": self.reason,
                "cost": None if self.cost is None else money_str(self.cost),
                "held": money_str(self.held), "hold_id": self.hold_id}


def decide(session: Session, request: AdmissionRequest, settings: Settings) -> Decision:
    minutes = request.time_limit_minutes or settings.admission_unlimited_minutes
    try:
        priced = quote(session, request.system, request.account, minutes=minutes, cpus=request.cpus,
                       gpus=request.gpus, nodes=request.nodes, partition=request.partition,
                       qos=request.qos, user=request.user, at=request.start_time, gpus_where_charged=True)
    except Unresolved as exc:
        # The charger would park this job's charge: under reject it does not run unpaid.
        policy = _policy(*_account_and_system(session, request), settings)
        return Decision(policy != "reject", policy, f"OpenAcct cannot charge this job: {exc}")
    account = session.get_one(Account, priced.account_id)
    policy = _policy(account, session.get(System, priced.system_id), settings)
    key = f"hold/{request.run_key}"
    # A member with a spending limit: the project's accounts are locked first (before the locks
    # below, in one order), so that what counts against the cap stands still while we decide.
    cap = member_limits.capped(session, account, priced.user_id)
    # Whatever this job's earlier runs hold is theirs no longer, admitted or not this time.
    ledger.release_earlier_runs(session, priced.system_id, request.job_id, request.array_task_id, keep=key,
                                account=account, actor="admission")
    over = _over_cap(session, cap, key, priced, request.start_time)
    if over is not None and policy == "reject":
        _record_job(session, request, priced, minutes, refused=True)  # as a job its account cannot cover
        log.info("job %s: %s", request.job_id, _over(over, priced, minutes, amounts=True))
        return Decision(False, policy, _over(over, priced, minutes), priced.total)
    expires = request.start_time + dt.timedelta(minutes=minutes, seconds=settings.hold_grace)
    limit, fit = {"reject": ("credit", False), "allow": ("credit", True), "notify": ("none", False)}[policy]
    refused = session.begin_nested()  # a job that does not start leaves no row behind
    job = _record_job(session, request, priced, minutes)
    try:
        held = ledger.hold(
            session, account, priced.total, job=job, limit=limit, fit=fit, expires_at=expires, key=key,
            actor="admission", description=f"job {request.job_id}: {minutes} min limit",
            details={"cost": money_str(priced.total)},
        ) if priced.total > 0 else None
    except InsufficientFunds:
        refused.rollback()
        # Slurm requeues the job, and jobcomp reports the run it refused as requeued: charge none of it.
        _record_job(session, request, priced, minutes, refused=True)
        log.info("job %s: %s", request.job_id, _short(priced, minutes, amounts=True))
        return Decision(False, policy, _short(priced, minutes), priced.total)
    refused.commit()
    amount = held.amount if held is not None else Decimal(0)
    reason = f"held {money_str(amount)} of {account.name!r} for at most {minutes} min"
    short = amount < priced.total or priced.total > priced.available + priced.credit_limit
    if over is not None or short:
        def why(amounts: bool) -> str:
            return "; ".join([*([_over(over, priced, minutes, amounts=amounts)] if over else []),
                              *([_short(priced, minutes, amounts=amounts)] if short else [])])
        log.warning("job %s: %s; started under policy %s, %s", request.job_id, why(True), policy, reason)
        reason = f"{why(False)}; started under policy {policy}, {reason}"
    return Decision(True, policy, reason, priced.total, amount, held.id if held is not None else None)


def _short(priced: Quote, minutes: int, *, amounts: bool = False) -> str:
    """Why the account falls short. Users read it in the job's AdminComment, which every cluster
    user may be able to see: the account's balance only goes to the log (``amounts``)."""
    said = (f"account {priced.account!r} cannot cover this job: it may cost up to {money_str(priced.total)} "
            f"({minutes} min limit)")
    if amounts:
        said += f", {money_str(priced.available)} available, credit limit {money_str(priced.credit_limit)}"
    return said


def _over_cap(session: Session, cap: MemberLimit | None, key: str, priced: Quote, at: dt.datetime) -> MemberUse | None:
    """What the job's user has spent against their cap in the project, when the job would pass it;
    None when it fits, they have no cap, or this run was admitted before (its hold counts in what
    they spent, and the ledger gives that hold back again)."""
    if cap is None or session.scalar(select(LedgerTransaction.id).where(LedgerTransaction.idempotency_key == key)):
        return None
    use = member_limits.use_of(session, cap, at)
    return None if use.fits(priced.total) else use


def _over(use: MemberUse, priced: Quote, minutes: int, *, amounts: bool = False) -> str:
    """Why the job passes its user's cap. The AdminComment gets no figure but the job's own cost
    (as ``_short``); the log gets what was spent of the cap (``amounts``)."""
    said = (f"the spending limit of user {use.user!r} in project {use.project!r} (per {use.period}) cannot cover "
            f"this job: it may cost up to {money_str(priced.total)} ({minutes} min limit)")
    if amounts:
        said += f", {money_str(use.spent)} spent of {money_str(use.cap)} since {use.since.isoformat()}"
    return said


def _account_and_system(session: Session, request: AdmissionRequest) -> tuple[Account | None, System | None]:
    """The job's account (by name, project or alias) and system as far as they are known."""
    directory = Directory.load(session, [request])
    found = directory.systems.get(request.system)
    if found is None:
        return None, None
    named = directory.accounts.get((found.id, request.account or ""))
    return (session.get(Account, named.id) if named else None), session.get(System, found.id)


def _policy(account: Account | None, system: System | None, settings: Settings) -> str:
    return ((account.admission_policy if account else None) or (system.admission_policy if system else None)
            or settings.admission_policy)


def _record_job(session: Session, request: AdmissionRequest, priced: Quote, minutes: int, *,
                refused: bool = False) -> Job:
    """The job's row, under the key its end-of-job event will name, so the hold is linked to it;
    that of a run refused says so, so that its requeue record charges nothing."""
    key = {"system_id": priced.system_id, "job_id": request.job_id, "array_task_id": request.array_task_id,
           "het_offset": None, "submit_time": request.submit_time}
    ids = upsert_jobs(session, [{
        **key, "array_job_id": request.array_job_id, "start_time": request.start_time, "user_id": priced.user_id,
        "account_id": priced.account_id, "partition": request.partition, "qos": request.qos,
        "state": "PENDING" if refused else "RUNNING", "charge_policy": REFUSED if refused else None, "node_count": request.nodes or None, "node_list": request.node_list,
        "cpus": request.cpus, "gpus": request.gpus, "time_limit_minutes": request.time_limit_minutes,
    }])
    job = session.get_one(Job, next(iter(ids.values())))
    if not refused and job.charge_policy == REFUSED:  # refused before, admitted now: it runs after all
        job.charge_policy = None
        session.flush()
    return job

