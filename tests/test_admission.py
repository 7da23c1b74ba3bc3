"""Admission control without Slurm: the decision, its hold, the settling charge and expiry.

The live Slurm tests (tests/slurm/test_admission_slurm.py) run the same through the real prolog."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
from sqlalchemy import select

from openacct.shortcuts import balance, deposit, get_account, get_system
from services.admission.decide import AdmissionRequest, decide
from services.charger.batch import charge_events
from services.reporter import alerts
from shared import ledger
from shared.config import Settings
from shared.db import session_scope
from shared.models import Job, LedgerTransaction, OpenHold
from shared.rating.jobs import REFUSED
from tests.events import job_completed, raw

D = Decimal
UTC = dt.UTC
# cluster-core-hours cost 0.05: 6 CPUs for 60 minutes is 0.30.
COST = D("0.30")


def request(job: int, *, account: str = "phys", cpus: int = 6, minutes: int | None = 60,
            start: dt.datetime | None = None, restart: int = 0) -> AdmissionRequest:
    start = start or dt.datetime.now(UTC).replace(microsecond=0)
    return AdmissionRequest(system="cluster", job_id=str(job), submit_time=start - dt.timedelta(minutes=1),
                            start_time=start, user="tux", account=account, partition="batch", cpus=cpus,
                            nodes=1, time_limit_minutes=minutes, restart_count=restart)


def ask(req: AdmissionRequest, **settings: object):  # type: ignore[no-untyped-def]
    with session_scope() as s:
        return decide(s, req, Settings(**settings))  # type: ignore[arg-type]


def verify() -> list[ledger.Mismatch]:
    with session_scope() as s:
        return ledger.verify(s)


def held(account: str = "phys") -> Decimal:
    return balance(account).held


def holds() -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "hold")))


def set_policy(account: str, policy: str | None) -> None:
    with session_scope() as s:
        s.get_one(type(get_account(account)), get_account(account).id).admission_policy = policy


pytestmark = pytest.mark.usefixtures("quickstart")


def test_an_account_without_money_is_refused_under_reject_and_nothing_is_held() -> None:
    refused = request(1)  # once: a second request(1) a clock second later would be another job
    decision = ask(refused)
    assert (decision.admit, decision.policy, decision.cost) == (False, "reject", COST)
    # What every cluster user may read in the job's AdminComment: not the account's balance.
    assert decision.reason == "account 'phys' cannot cover this job: it may cost up to 0.30 (60 min limit)"
    assert holds() == [] and held() == 0
    with session_scope() as s:  # its row says it never ran: the record of its requeue charges nothing
        [job] = s.scalars(select(Job).where(Job.job_id == "1")).all()
        assert (job.state, job.charge_policy) == ("PENDING", REFUSED)
    start = refused.start_time
    with session_scope() as s:  # Slurm requeues it: jobcomp's PENDING record of the refused run
        charge_events(s, [raw(job_completed(1, cpus=6, seconds=2, end=start + dt.timedelta(seconds=2),
                                            state="PENDING"))])
    assert balance("phys").charged == 0 and verify() == []


def test_a_funded_job_holds_its_most_cost_linked_to_its_job() -> None:
    deposit("phys", "1", start="2000-01-01")
    decision = ask(request(2))
    assert (decision.admit, decision.held) == (True, COST)
    [hold] = holds()
    with session_scope() as s:
        job = s.get_one(Job, hold.job_id)
        assert (job.job_id, job.state, job.cpus, job.time_limit_minutes) == ("2", "RUNNING", 6, 60)
        open_hold = s.get_one(OpenHold, hold.id)
        assert open_hold.remaining == COST
        assert open_hold.expires_at == job.start_time + dt.timedelta(minutes=60, seconds=3600)
    b = balance("phys")
    assert (b.held, b.available) == (COST, D("0.70"))


def test_the_same_run_asked_twice_holds_once_and_a_restart_holds_in_its_place() -> None:
    deposit("phys", "1", start="2000-01-01")
    start = dt.datetime.now(UTC).replace(microsecond=0)
    first, again = ask(request(3, start=start)), ask(request(3, start=start))
    assert first.hold_id == again.hold_id and held() == COST
    restarted = ask(request(3, start=start, restart=1))
    assert restarted.hold_id != first.hold_id and held() == COST
    assert len(holds()) == 2


def test_two_jobs_that_together_exceed_the_balance_the_second_is_refused_under_reject() -> None:
    deposit("phys", "0.50", start="2000-01-01", credit_limit="0.05")
    assert ask(request(10)).admit
    second = ask(request(11))
    assert not second.admit and "it may cost up to 0.30" in second.reason
    b = balance("phys")
    assert b.available >= -b.credit_limit and b.held == COST


def test_allow_starts_the_job_and_holds_only_what_fits_within_the_credit_limit() -> None:
    deposit("phys", "0.50", start="2000-01-01", credit_limit="0.05")
    set_policy("phys", "allow")
    ask(request(10))
    second = ask(request(11))
    assert (second.admit, second.policy, second.held) == (True, "allow", D("0.25"))
    b = balance("phys")
    assert (b.available, b.credit_limit) == (D("-0.05"), D("0.05"))
    assert ask(request(12)).held == 0  # nothing fits now; it still starts
    assert ask(request(12)).admit


def test_notify_starts_the_job_and_holds_all_of_it_past_the_credit_limit() -> None:
    deposit("phys", "0.50", start="2000-01-01")
    with session_scope() as s:
        s.get_one(type(get_system("cluster")), get_system("cluster").id).admission_policy = "notify"
    ask(request(10))
    second = ask(request(11))
    assert (second.admit, second.policy, second.held) == (True, "notify", COST)
    assert "cannot cover this job" in second.reason and balance("phys").available == D("-0.10")
    with session_scope() as s:  # the notice: the PI's low-balance alert, on the reporter's next run
        [alert] = [a for a in alerts.due(s, Settings()) if a.project == "phys"]
    assert alert.kind == "low_balance" and "used 120% of its allocations (threshold 100%)" in alert.message


def test_an_accounts_policy_wins_over_its_systems_and_the_systems_over_the_sites() -> None:
    with session_scope() as s:
        s.get_one(type(get_system("cluster")), get_system("cluster").id).admission_policy = "notify"
    assert ask(request(1), admission_policy="reject").policy == "notify"
    set_policy("phys", "reject")
    assert ask(request(2), admission_policy="notify").policy == "reject"


def test_a_job_the_charger_could_not_charge_is_refused_under_reject_only() -> None:
    refused = ask(request(1, account="nope"))
    assert not refused.admit and "unknown account 'nope'" in refused.reason
    assert ask(request(1, account="nope"), admission_policy="allow").admit
    assert not ask(AdmissionRequest(**{**request(2).model_dump(), "user": "bob"})).admit  # not a member of phys
    set_policy("phys", "allow")  # the account's own policy, even for a job it cannot be charged
    assert ask(AdmissionRequest(**{**request(2).model_dump(), "user": "bob"})).admit


def test_a_job_without_a_time_limit_is_priced_at_the_unlimited_setting() -> None:
    deposit("phys", "100", start="2000-01-01")
    assert ask(request(1, minutes=None), admission_unlimited_minutes=600).cost == 10 * COST


def test_the_jobs_charge_releases_its_hold_in_the_same_transaction() -> None:
    deposit("phys", "10", start="2000-01-01")
    end = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    event = job_completed(20, cpus=6, seconds=1800, end=end)
    start = dt.datetime.fromisoformat(event["start_time"])
    req = AdmissionRequest(**{**request(20, start=start).model_dump(),
                              "submit_time": dt.datetime.fromisoformat(event["submit_time"])})
    assert ask(req).held == COST
    with session_scope() as s:
        charge_events(s, [raw(event).decode()])
        charge_events(s, [raw(event).decode()])  # a repeat settles nothing more
    b = balance("phys")
    assert (b.held, b.charged, b.available) == (0, D("0.15"), D("9.85"))
    with session_scope() as s:
        [hold] = holds()
        [release] = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "release")).all()
        [charge] = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all()
        assert release.refers_to_id == hold.id and release.job_id == charge.job_id == hold.job_id
        assert s.scalars(select(OpenHold)).all() == []
    assert verify() == []


def releases() -> list[LedgerTransaction]:
    with session_scope() as s:
        return list(s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "release")
                              .order_by(LedgerTransaction.id)))


def pending_record(job: int, start: dt.datetime, requeued_at: dt.datetime) -> str:
    """jobcomp's record of a run that Slurm requeued: PENDING, from its start to the requeue,
    under the run's submit time (the next run is submitted anew at the requeue)."""
    return raw(job_completed(job, cpus=6, seconds=int((requeued_at - start).total_seconds()), end=requeued_at,
                             state="PENDING")).decode()


def test_a_requeued_job_asking_again_gives_back_what_its_earlier_run_held(monkeypatch: pytest.MonkeyPatch) -> None:
    deposit("phys", "0.40", start="2000-01-01")  # one run's 0.30, not two
    now = dt.datetime.now(UTC).replace(microsecond=0)
    first_start, requeued_at = now - dt.timedelta(minutes=10), now - dt.timedelta(minutes=5)
    monkeypatch.setattr(ledger, "now", lambda: first_start)
    assert ask(request(30, start=first_start)).held == COST
    monkeypatch.undo()
    # The next run asks before the first run's record arrives (the pipeline may be down): it is
    # admitted, holding its own 0.30 in place of the first run's. Slurm submitted it anew.
    second = ask(request(30, start=requeued_at + dt.timedelta(minutes=3), restart=1))
    assert second.admit and second.held == COST and held() == COST
    [rerun] = releases()
    assert rerun.refers_to_id == holds()[0].id
    with session_scope() as s:  # the first run's record, late: charged; the running one's hold stays
        charge_events(s, [pending_record(30, first_start, requeued_at)])
    assert held() == COST and len(releases()) == 1
    assert balance("phys").charged == D("0.025")  # 6 CPUs for the 5 minutes the first run ran
    assert verify() == []


def test_a_requeued_run_is_charged_for_the_time_it_ran_and_gives_back_its_hold() -> None:
    deposit("phys", "10", start="2000-01-01")
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
    assert ask(request(31, start=start)).held == COST
    # Requeued by its user after 10 minutes (and then, say, cancelled while pending: no next
    # run asks): 6 CPUs x 10 minutes are charged under the REQUEUED policy, and its hold settled.
    requeued_at = start + dt.timedelta(minutes=10)
    with session_scope() as s:
        charge_events(s, [pending_record(31, start, requeued_at)])
        charge_events(s, [pending_record(31, start, requeued_at)])  # again: nothing more
    assert held() == 0
    [release] = releases()
    assert release.refers_to_id == holds()[0].id
    with session_scope() as s:
        assert s.scalars(select(OpenHold)).all() == []
        [charge] = s.scalars(select(LedgerTransaction).where(LedgerTransaction.kind == "charge")).all()
        assert (charge.amount, charge.details["state"]) == (D("0.05"), "REQUEUED")
    assert verify() == []


def test_a_site_may_make_requeued_runs_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENACCT_FREE_STATES", '["NODE_FAIL", "REQUEUED"]')
    from shared.config import get_settings

    get_settings.cache_clear()
    try:
        deposit("phys", "10", start="2000-01-01")
        start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
        with session_scope() as s:
            charge_events(s, [pending_record(32, start, start + dt.timedelta(minutes=10))])
        assert balance("phys").charged == 0
        with session_scope() as s:
            [job] = s.scalars(select(Job).where(Job.job_id == "32")).all()
            assert (job.state, job.charge_policy) == ("REQUEUED", "state REQUEUED is not charged")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_gpu_job_on_a_system_that_charges_no_gpus_is_priced_for_its_cpus() -> None:
    deposit("phys", "1", start="2000-01-01")
    decision = ask(request(23).model_copy(update={"gpus": 4}))  # the quick start has no GPU service
    assert decision.admit and decision.cost == COST


def test_the_gpus_squeue_gave_at_the_start_are_held_and_then_charged() -> None:
    from openacct.shortcuts import create_service, grant_service_access

    gpu_hours = create_service("cluster-gpu-hours", system="cluster", units="gpu-hours", charge_rate="1")
    grant_service_access(gpu_hours, project="phys")
    deposit("phys", "10", start="2000-01-01")
    end = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    event = job_completed(21, cpus=6, seconds=1800, end=end)  # jobcomp's: no GPUs in it
    req = AdmissionRequest(**{**request(21, start=dt.datetime.fromisoformat(event["start_time"])).model_dump(),
                              "submit_time": dt.datetime.fromisoformat(event["submit_time"]), "gpus": 2})
    assert ask(req).held == COST + 2  # 2 GPUs for the 60 min limit at 1 an hour
    with session_scope() as s:
        charge_events(s, [raw(event).decode()])
        charged = {t.details["resource"]: (t.quantity, t.amount) for t in s.scalars(
            select(LedgerTransaction).where(LedgerTransaction.kind == "charge"))}
    assert charged == {"cpu": (D("3"), D("0.15")), "gpu": (D("1"), D("1"))}  # half an hour of each
    assert held() == 0 and verify() == []


def test_the_gpus_admission_recorded_are_charged_from_the_ctld_epilogs_event_too() -> None:
    from openacct.shortcuts import create_service, grant_service_access
    from shared.event_id import job_event_id

    grant_service_access(create_service("cluster-gpu-hours", system="cluster", units="gpu-hours", charge_rate="1"),
                         project="phys")
    deposit("phys", "10", start="2000-01-01")
    end = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    event = job_completed(22, cpus=6, seconds=1800, end=end)
    start = dt.datetime.fromisoformat(event["start_time"])
    assert ask(AdmissionRequest(**{**request(22, start=start).model_dump(), "gpus": 1,
                                   "submit_time": dt.datetime.fromisoformat(event["submit_time"])})).admit
    del event["submit_time"]  # EpilogSlurmctld's: known by its start, no GPUs
    event["event_id"] = job_event_id("job.completed", "cluster", "22", None, None, None, int(start.timestamp()))
    with session_scope() as s:
        charge_events(s, [raw(event).decode()])
        charged = {t.details["resource"]: t.quantity for t in s.scalars(
            select(LedgerTransaction).where(LedgerTransaction.kind == "charge"))}
    assert charged == {"cpu": D("3"), "gpu": D("0.5")} and held() == 0


def test_a_hold_whose_job_never_reports_back_expires_after_the_grace_period() -> None:
    deposit("phys", "1", start="2000-01-01")
    deposit("chem", "1", start="2000-01-01")
    long_ago = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=3)
    ask(request(30, start=long_ago), hold_grace=3600)  # 1 h limit + 1 h grace: expired an hour ago
    ask(request(31, account="chem"), hold_grace=3600)  # still running
    with session_scope() as s:
        assert ledger.expire_holds(s, long_ago + dt.timedelta(hours=1)) == []
        [expired] = ledger.expire_holds(s)
        assert ledger.expire_holds(s) == []
    assert expired.description.startswith("hold expired") and (held(), held("chem")) == (0, COST)
    assert verify() == []


def test_an_accounts_next_hold_expires_its_stale_ones_first() -> None:
    deposit("phys", "0.40", start="2000-01-01")
    long_ago = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=3)
    assert ask(request(40, start=long_ago), hold_grace=0).admit
    assert ask(request(41)).admit  # 0.10 would be left if the stale hold still counted
    assert held() == COST


def test_verify_notices_an_open_hold_that_disagrees_with_the_journal() -> None:
    deposit("phys", "1", start="2000-01-01")
    hold_id = ask(request(50)).hold_id
    with session_scope() as s:
        s.get_one(OpenHold, hold_id).remaining = D("0.01")
    assert [str(m) for m in verify()] == [f"hold #{hold_id}: journal has 0.30 still held, open holds 0.01"]


def test_bad_requests_are_refused_with_the_field_at_fault() -> None:
    from services.admission.server import answer

    good = json.loads(request(1).model_dump_json())
    assert "time_limit_minutes" in answer(json.dumps({**good, "time_limit_minutes": "1"}).encode(), Settings())["error"]
    assert "job_id" in answer(json.dumps({**good, "job_id": "1; rm"}).encode(), Settings())["error"]
    assert "extra" in answer(json.dumps({**good, "price": 0}).encode(), Settings())["error"].lower()
    assert answer(b"not json", Settings())["error"].startswith("invalid request")


def test_a_run_refused_then_admitted_is_charged_and_one_refused_then_cancelled_is_not() -> None:
    start = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=2)
    assert not ask(request(40, start=start)).admit  # no money yet
    deposit("phys", "10", start="2000-01-01")
    assert ask(request(40, start=start)).admit  # asked again for the same run: it runs after all
    assert not ask(request(41, account="chem", start=start)).admit  # chem has nothing
    end = start + dt.timedelta(hours=1)
    with session_scope() as s:  # 40 ran its hour; 41 was refused, and then cancelled rather than requeued
        charge_events(s, [raw(job_completed(40, cpus=6, seconds=3600, end=end)).decode(),
                          raw(job_completed(41, account="chem", cpus=6, seconds=3600, end=end,
                                            state="CANCELLED")).decode()])
    with session_scope() as s:
        charged = {job: amount for job, amount in s.execute(
            select(Job.job_id, LedgerTransaction.amount).join(LedgerTransaction, LedgerTransaction.job_id == Job.id)
            .where(LedgerTransaction.kind == "charge"))}
    assert charged == {"40": COST}
    assert verify() == []
