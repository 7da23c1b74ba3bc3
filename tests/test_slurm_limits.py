"""Limits mode (``openacct slurm limits``): the GrpTRESMins each Slurm account is given, from the
ledger (real PostgreSQL, the quick-start center: core-hours at 0.05, so a billing minute costs
0.05 / 60) and Slurm's side given as the text its commands print."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction

import pytest

from openacct import shortcuts as oa
from shared import config
from shared.db import session_scope
from shared.models import ChargeMultiplier
from shared.slurm.limits import (
    LimitsRefused,
    SlurmSide,
    check_config,
    parse_associations,
    parse_billing_weights,
    parse_config,
    parse_jobs,
    plan,
)

# As Slurm 22.05 prints them (one line per association with -o; only billing shown here is real format).
ASSOC_MGR = (
    "ClusterName=cluster Account=root UserName= Partition= Priority=0 ID=1 SharesRaw/Norm/Level/Factor=1/0.00/0/0.00 "
    "UsageRaw/Norm/Efctv=0.00/0.00/0.00 ParentAccount= Lft=1 DefAssoc=No GrpJobs=N(0) GrpJobsAccrue=N(0) "
    "GrpSubmitJobs=N(0) GrpWall=N(0.00) GrpTRES=cpu=N(0),mem=N(0),energy=N(0),node=N(0),billing=N(0) "
    "GrpTRESMins=cpu=N(0),mem=N(0),energy=N(0),node=N(0),billing=N(0) "
    "GrpTRESRunMins=cpu=N(0),mem=N(0),energy=N(0),node=N(0),billing=N(0) MaxJobs= MaxJobsAccrue= MaxSubmitJobs=\n"
    "ClusterName=cluster Account=phys UserName= Partition= Priority=0 ID=2 GrpTRES=cpu=N(2),billing=N(2) "
    "GrpTRESMins=cpu=N(30),mem=N(0),billing={phys}(30) GrpTRESRunMins=cpu=N(100),billing=N(100) MaxJobs=\n"
    "ClusterName=cluster Account=phys UserName=tux(1001) Partition= Priority=0 ID=3 "
    "GrpTRESMins=cpu=N(30),billing=N(30) GrpTRESRunMins=cpu=N(100),billing=N(100)\n"
    "ClusterName=cluster Account=chem UserName= Partition= Priority=0 ID=4 "
    "GrpTRESMins=cpu=N(7),billing=7(7) GrpTRESRunMins=cpu=N(0),billing=N(0)\n"
    "ClusterName=cluster Account=local UserName= Partition= Priority=0 ID=5 "
    "GrpTRESMins=cpu=N(9),billing=N(9) GrpTRESRunMins=cpu=N(0),billing=N(0)\n"
)
# squeue -h -t all -O JobID:0|,Account:0|,State:0|,TimeLimit:0|,TimeUsed:0|,tres-alloc:0|
RUNNING_JOB = "41|phys|RUNNING|1:00:00|10:00|cpu=2,mem=2000M,node=1,billing=2|\n"  # 2 x 60 reserved, 100 left
ENDED_JOB = "40|phys|COMPLETED|5:00|3:00|cpu=1,mem=1000M,node=1,billing=1|\n"  # 3 minutes, maybe not charged
CONFIG = ("ClusterName             = cluster\nAccountingStorageEnforce = associations,limits,safe\n"
          "PriorityType            = priority/multifactor\nPriorityDecayHalfLife   = 00:00:00\n"
          "PriorityUsageResetPeriod = NONE\n")
MINUTE = Fraction(Decimal("0.05")) / 60


def side(jobs: str = "", phys_limit: str = "N", weights: str = "") -> SlurmSide:
    return SlurmSide("cluster", parse_associations(ASSOC_MGR.format(phys=phys_limit)), parse_jobs(jobs),
                     parse_billing_weights(weights), [])


def limits(slurm: SlurmSide) -> dict[str, tuple[int | None, int]]:
    with session_scope() as s:
        return {limit.slurm_account: (limit.current, limit.wanted) for limit in plan(s, slurm).limits}


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Settings changed through OPENACCT_* variables for one test, and forgotten after it."""
    yield monkeypatch
    monkeypatch.undo()
    config.get_settings.cache_clear()


@pytest.mark.usefixtures("quickstart")
def test_used_plus_the_minutes_the_money_pays_rounded_down_and_only_for_accounts_openacct_knows() -> None:
    oa.deposit("phys", "10.0101", start="2000-01-01")  # 12012.12 minutes: 12012
    assert limits(side()) == {"chem": (7, 7), "phys": (None, 30 + 12012)}  # not root, not the site's 'local'
    assert limits(side(phys_limit="12042"))["phys"] == (12042, 12042)  # in step: nothing to change


@pytest.mark.usefixtures("quickstart")
def test_an_account_with_nothing_to_pay_gets_what_it_used_never_less() -> None:
    oa.deposit("chem", "1", start="2000-01-01")
    oa.charge("chem", service="cluster-core-hours", quantity="30")  # 1.50: 0.50 in debt
    assert limits(side())["chem"] == (7, 7)


@pytest.mark.usefixtures("quickstart")
def test_the_credit_limit_counts_as_admission_control_counts_it() -> None:
    oa.deposit("phys", "0.5", start="2000-01-01", credit_limit="0.5")
    assert limits(side())["phys"][1] == 30 + 1200


@pytest.mark.usefixtures("quickstart")
def test_minutes_slurm_counted_that_the_ledger_has_not_charged_yet_are_not_given_twice() -> None:
    oa.deposit("phys", "1", start="2000-01-01")  # 1200 minutes
    # The running job has used 2 x 60 - 100 = 20 of its minutes: Slurm's 30 used holds them.
    assert limits(side(RUNNING_JOB))["phys"][1] == 30 + 1200 - 20
    # An ended job the ledger has not charged: its 3 minutes too.
    assert limits(side(RUNNING_JOB + ENDED_JOB))["phys"][1] == 30 + 1200 - 20 - 3


@pytest.mark.usefixtures("quickstart")
def test_an_ended_job_the_ledger_recorded_counts_once() -> None:
    import datetime as dt

    from shared.models import Job

    oa.deposit("phys", "1", start="2000-01-01")
    end = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    with session_scope() as s:
        s.add(Job(system_id=oa.get_system("cluster").id, job_id="40", submit_time=end - dt.timedelta(minutes=5),
                  start_time=end - dt.timedelta(minutes=3), end_time=end, state="COMPLETED", cpus=1,
                  user_id=oa.get_user("tux").id, account_id=oa.get_account("phys").id))
    assert limits(side(ENDED_JOB))["phys"][1] == 30 + 1200


def test_the_configuration_the_mode_needs(settings_env: pytest.MonkeyPatch) -> None:
    assert check_config(parse_config(CONFIG)) == []
    for line, error in [("PriorityDecayHalfLife = 7-00:00:00", "set PriorityDecayHalfLife=0"),
                        ("PriorityUsageResetPeriod = MONTHLY", "set PriorityUsageResetPeriod=NONE"),
                        ("PriorityType = priority/basic", "only under PriorityType=priority/multifactor"),
                        ("AccountingStorageEnforce = associations", "AccountingStorageEnforce=associations,limits,safe")]:
        with pytest.raises(LimitsRefused, match=error):
            check_config(parse_config(CONFIG + line + "\n"))
    [warning] = check_config(parse_config(CONFIG + "AccountingStorageEnforce = associations,limits\n"))
    assert "no 'safe'" in warning


@pytest.mark.usefixtures("quickstart")
def test_without_a_price_it_cannot_derive_it_refuses_and_an_explicit_one_is_used(
        settings_env: pytest.MonkeyPatch) -> None:
    oa.deposit("phys", "1", start="2000-01-01")
    with pytest.raises(LimitsRefused, match="TRESBillingWeights on gpu"):
        limits(side(weights="PartitionName=gpu TRESBillingWeights=CPU=1.0,GRES/gpu=4.0\nPartitionName=debug\n"))
    with session_scope() as s:
        s.add(ChargeMultiplier(system_id=oa.get_system("cluster").id, kind="partition", name="big",
                               multiplier=Decimal(2)))
    with pytest.raises(LimitsRefused, match="partition or QoS charge multipliers"):
        limits(side())
    settings_env.setenv("OPENACCT_SLURM_BILLING_MINUTE_PRICE", '{"cluster": "0.003"}')
    config.get_settings.cache_clear()
    assert limits(side(weights="PartitionName=gpu TRESBillingWeights=CPU=1.0\n"))["phys"][1] == 30 + 333


def test_the_jobs_squeue_lists() -> None:
    [running, ended] = parse_jobs(RUNNING_JOB + ENDED_JOB)
    assert (running.billing, running.limit_minutes, running.used_seconds) == (2, 60, 600)
    assert (ended.state, ended.used_seconds) == ("COMPLETED", 180)
    assert MINUTE == Fraction(1, 1200)


def test_in_limits_mode_a_deposit_whose_limits_cannot_be_set_still_deposits(
        cli, settings_env: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings_env.setenv("PATH", str(tmp_path))  # no scontrol, no sacctmgr
    settings_env.setenv("OPENACCT_SLURM_BIN_DIR", str(tmp_path))
    settings_env.setenv("OPENACCT_SLURM_LIMITS", "true")
    config.get_settings.cache_clear()
    result = cli("deposit", "phys", "5")
    assert result.code == 0, result.err
    assert "the money moved, and the scheduled `openacct slurm limits` run will catch up" in result.err
    assert "scontrol is neither on PATH" in result.err
    assert Decimal(cli("balance", "phys", "--json").json()["available"]) == 5
    assert cli("slurm", "limits", "--dry-run").code == 1


def test_a_billing_minute_price_must_be_above_zero() -> None:
    from shared.config import Settings

    with pytest.raises(ValueError, match="must be above 0"):
        Settings(slurm_billing_minute_price={"cluster": "0"})
