"""Limits mode (``openacct slurm limits``): the GrpTRESMins each Slurm account is given, from the
ledger (real PostgreSQL, the quick-start center: core-hours at 0.05, so a billing minute costs
0.05 / 60) and Slurm's side given as the text its commands print."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction

import pytest

from openacct import shortcuts as oa
from shared import config
from shared.db import session_scope
from shared.models import ChargeMultiplier, Job
from shared.slurm import limits as limits_mode
from shared.slurm.limits import (
    LIMITS_LOCK,
    LimitsRefused,
    SlurmSide,
    check_config,
    parse_associations,
    parse_billing_weights,
    parse_config,
    parse_jobs,
    parse_usage_factors,
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
    "ClusterName=cluster Account=chem UserName= Partition= Priority=0 ID=4 ParentAccount={chem_parent} Lft=7 "
    "GrpTRESMins=cpu=N(7),billing=7(7) GrpTRESRunMins=cpu=N(0),billing=N(0)\n"
    "ClusterName=cluster Account=local UserName= Partition= Priority=0 ID=5 "
    "GrpTRESMins=cpu=N(9),billing=N(9) GrpTRESRunMins=cpu=N(0),billing=N(0)\n"
)
# squeue -a -h -t all -O JobID:0|,Account:0|,State:0|,QOS:0|,SubmitTime:0|,TimeUsed:0|,tres-alloc:0|
# (SLURM_TIME_FORMAT=%s: SubmitTime in epoch seconds)
RUNNING_JOB = "41|phys|RUNNING|normal|1767268800|10:00|cpu=2,mem=2000M,node=1,billing=2|\n"  # 20 minutes so far
ENDED_JOB = "40|phys|COMPLETED|normal|1767268500|3:00|cpu=1,mem=1000M,node=1,billing=1|\n"  # 3 minutes, maybe not charged
SUBMITTED_40 = dt.datetime(2026, 1, 1, 11, 55, tzinfo=dt.UTC)  # 1767268500
QOS = "normal|1.000000\nlow|\n"  # sacctmgr -n -P show qos format=name,usagefactor
CONFIG = ("ClusterName             = cluster\nAccountingStorageEnforce = associations,limits,safe\n"
          "PriorityType            = priority/multifactor\nPriorityDecayHalfLife   = 00:00:00\n"
          "PriorityUsageResetPeriod = NONE\n")
MINUTE = Fraction(Decimal("0.05")) / 60


def side(jobs: str = "", phys_limit: str = "N", weights: str = "", qos: str = QOS, chem_parent: str = "root(1)",
         ) -> SlurmSide:
    return SlurmSide("cluster", parse_associations(ASSOC_MGR.format(phys=phys_limit, chem_parent=chem_parent)),
                     parse_jobs(jobs), parse_billing_weights(weights), [], parse_usage_factors(qos))


def record_end(job_id: str, submit: dt.datetime, minutes: int = 3) -> None:
    """The ledger's record of a job that ended (as the charger leaves it)."""
    end = submit + dt.timedelta(minutes=5)
    with session_scope() as s:
        s.add(Job(system_id=oa.get_system("cluster").id, job_id=job_id, submit_time=submit,
                  start_time=end - dt.timedelta(minutes=minutes), end_time=end, state="COMPLETED", cpus=1,
                  user_id=oa.get_user("tux").id, account_id=oa.get_account("phys").id))


def plan_of(slurm: SlurmSide) -> limits_mode.Plan:
    with session_scope() as s:
        return plan(s, slurm)


def limits(slurm: SlurmSide) -> dict[str, tuple[int | None, int]]:
    return {limit.slurm_account: (limit.current, limit.wanted) for limit in plan_of(slurm).limits}


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
    # The running job has used 2 x 10 minutes: Slurm's 30 used holds them (up to its last count).
    assert limits(side(RUNNING_JOB))["phys"][1] == 30 + 1200 - 20
    # An ended job the ledger has not charged: its 3 minutes too.
    assert limits(side(RUNNING_JOB + ENDED_JOB))["phys"][1] == 30 + 1200 - 20 - 3


@pytest.mark.usefixtures("quickstart")
def test_pending_is_each_jobs_time_used_whatever_slurm_still_reserves() -> None:
    """Not time limit less what Slurm still reserves, summed over the account: a job with no time
    limit (or 365 days, which time_limit_minutes reads as none) reserves nothing, and the reserve
    is no guide to what ran. Slurm counts seconds: so does pending, exactly."""
    oa.deposit("phys", "1", start="2000-01-01")
    unlimited = "42|phys|RUNNING|normal|1767268800|10:00:01|cpu=1,billing=1|\n"  # 600 minutes and a second
    short = "43|phys|RUNNING|normal|1767268800|1:01|cpu=1,billing=1|\n"
    [limit] = [lim for lim in plan_of(side(unlimited + short)).limits if lim.slurm_account == "phys"]
    assert (limit.pending, limit.wanted) == (Fraction(36_001 + 61, 60), 30 + 1200 - 602)  # 601.03: 599 left
    long_ago = "44|phys|RUNNING|normal|1767268800|2-00:00:00|cpu=1,billing=1|\n"  # more than the money pays
    assert limits(side(long_ago))["phys"][1] == 30  # what Slurm counted, never less


@pytest.mark.usefixtures("quickstart")
def test_a_qos_usage_factor_multiplies_what_slurm_counted(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("OPENACCT_SLURM_BILLING_MINUTE_PRICE", '{"cluster": "0.001"}')
    config.get_settings.cache_clear()
    oa.deposit("phys", "1", start="2000-01-01")  # 1000 minutes
    qos = QOS + "double|2.000000\nhalf|0.500000\n"
    running = RUNNING_JOB.replace("|normal|", "|double|")  # 2 x 10 minutes x 2
    ended = ENDED_JOB.replace("|normal|", "|half|")  # 1 x 3 minutes x 0.5 = 1.5
    assert limits(side(running + ended, qos=qos))["phys"][1] == 30 + 1000 - 42  # 958.5 rounded down
    # A QoS sacctmgr no longer lists: the largest factor there is.
    assert limits(side(RUNNING_JOB.replace("|normal|", "|gone|"), qos=qos))["phys"][1] == 30 + 1000 - 40


@pytest.mark.usefixtures("quickstart")
def test_a_completing_job_is_an_ended_one() -> None:
    """slurmctld releases a job's run minutes and counts its usage when it deallocates its nodes:
    a COMPLETING (or STAGE_OUT) job the ledger charged is charged, not running."""
    oa.deposit("phys", "1", start="2000-01-01")
    completing = ENDED_JOB.replace("COMPLETED", "COMPLETING")
    assert limits(side(completing))["phys"][1] == 30 + 1200 - 3
    record_end("40", SUBMITTED_40)
    assert limits(side(completing))["phys"][1] == 30 + 1200
    assert limits(side(completing.replace("COMPLETING", "STAGE_OUT")))["phys"][1] == 30 + 1200


@pytest.mark.usefixtures("quickstart")
def test_an_ended_job_the_ledger_recorded_counts_once() -> None:
    oa.deposit("phys", "1", start="2000-01-01")
    record_end("40", SUBMITTED_40)
    assert limits(side(ENDED_JOB))["phys"][1] == 30 + 1200


@pytest.mark.usefixtures("quickstart")
def test_a_reused_or_requeued_job_id_is_not_the_job_the_ledger_charged() -> None:
    """Slurm reuses ids (a restart, MaxJobId) and gives a requeued job a new submit time: only
    the same (job id, submit time) is the charged job."""
    oa.deposit("phys", "1", start="2000-01-01")
    record_end("40", SUBMITTED_40 - dt.timedelta(days=30))
    assert limits(side(ENDED_JOB))["phys"][1] == 30 + 1200 - 3
    record_end("40", SUBMITTED_40)
    assert limits(side(ENDED_JOB))["phys"][1] == 30 + 1200


@pytest.mark.usefixtures("quickstart")
def test_a_sub_account_under_an_account_openacct_limits_is_refused() -> None:
    oa.deposit("phys", "1", start="2000-01-01")
    with pytest.raises(LimitsRefused, match=r"sub-accounts under an account OpenAcct limits: chem \(under phys\)"):
        limits(side(chem_parent="phys(2)"))
    assert limits(side(chem_parent="root(1)"))["chem"] == (7, 7)


@pytest.mark.usefixtures("quickstart")
def test_slurm_accounts_openacct_does_not_know_are_named_in_warnings() -> None:
    [warning] = plan_of(side()).warnings
    assert "left without a limit: local" in warning


@pytest.mark.usefixtures("quickstart")
def test_two_runs_never_interleave_between_reading_slurm_and_setting_limits(
        monkeypatch: pytest.MonkeyPatch, engine) -> None:  # type: ignore[no-untyped-def]
    """A run holds the advisory lock from before it reads Slurm until its limits are set: another
    run (another connection) cannot take it in between."""
    free: list[tuple[str, bool]] = []

    def lock_free(when: str) -> None:
        def attempt() -> None:  # from another thread and connection, as a second run would
            with engine.connect() as other:
                free.append((when, other.execute(
                    limits_mode.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": LIMITS_LOCK}).scalar_one()))
                other.rollback()
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()

    def read_slurm() -> SlurmSide:
        lock_free("read")
        return side()

    def apply(found: limits_mode.Plan) -> list[str]:
        lock_free("apply")
        return []

    monkeypatch.setattr(limits_mode, "read_slurm", read_slurm)
    monkeypatch.setattr(limits_mode, "apply", apply)
    with session_scope() as s:
        limits_mode.keep_in_step(s)
    assert free == [("read", False), ("apply", False)]


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


@pytest.mark.usefixtures("quickstart")
def test_a_qos_usage_factor_other_than_1_refuses_the_derived_price() -> None:
    oa.deposit("phys", "1", start="2000-01-01")
    with pytest.raises(LimitsRefused, match=r"UsageFactor other than 1 \(half \(UsageFactor=0.5\)\); set "
                                            r"slurm_billing_minute_price"):
        limits(side(qos=QOS + "half|0.500000\n"))
    assert limits(side(qos=QOS))["phys"][1] == 30 + 1200  # 1.000000, or blank (Slurm's default): derived


def test_the_jobs_squeue_lists() -> None:
    [running, ended] = parse_jobs(RUNNING_JOB + ENDED_JOB)
    assert (running.billing, running.qos, running.submit_time, running.used_seconds) == (2, "normal", 1767268800, 600)
    assert (ended.job_id, ended.state, ended.used_seconds) == ("40", "COMPLETED", 180)
    assert int(SUBMITTED_40.timestamp()) == ended.submit_time
    assert parse_usage_factors(QOS + "odd|0.333333\n") == {"normal": 1, "low": 1, "odd": Fraction(333333, 1000000)}
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


def test_the_command_shows_the_warnings(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(limits_mode, "read_slurm", side)
    result = cli("slurm", "limits", "--dry-run")
    assert result.code == 0, result.err
    assert "warning: Slurm accounts OpenAcct does not know are left without a limit: local" in result.err
    [warning] = cli("slurm", "limits", "--dry-run", "--json").json()["warnings"]
    assert "without a limit: local" in warning
