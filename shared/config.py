"""Configuration: ``OPENACCT_*`` environment variables, then a TOML file, then defaults.

Scheduler hooks run with an almost empty environment, so everything can also come from a file:
``OPENACCT_CONFIG`` names it, else ``/etc/openacct/openacct.toml`` is read when it exists.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from shared import hookconfig


def config_file() -> Path | None:
    path = hookconfig.config_path()
    return Path(path) if path else None


def default_data_dir() -> Path:
    return Path(hookconfig.default_data_dir())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPENACCT_", extra="forbid", frozen=True)

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL. Unset: an embedded PostgreSQL is started under data_dir.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL (redis:// or amqp://). Unset: an embedded Redis is started.",
    )
    data_dir: Path = Field(default_factory=default_data_dir)
    spool_dir: Path | None = Field(
        default=None, description="Where hooks spool events for the relay. Unset: data_dir/spool."
    )
    default_system: str | None = Field(
        default=None,
        description="System a hook's events belong to when the scheduler does not say "
        "(Slurm's jobcomp CLUSTER is empty without slurmdbd).",
    )
    free_states: list[str] = Field(
        default=["NODE_FAIL"],
        description="Job states not charged; jobs ending in any other state pay for their elapsed time. "
        "A run that Slurm requeued ends in REQUEUED: charged unless listed here.",
    )
    refund_states: dict[str, Decimal] = Field(
        default={},
        description="Job states charged and then refunded in part, automatically: a fraction per "
        'state, such as {"PREEMPTED": 0.5}. States in free_states are not charged at all.',
    )
    relay_batch_size: int = Field(
        default=5000, ge=1, le=20_000,
        description="Events per task message at most (fewer when fewer wait). With a backlog, a "
        "charger batch's fixed cost (a dozen statements) is spread over more events: bench/ingest.py "
        "gained 7% from 2,000 to 5,000 and nothing past it.")
    relay_confirms: bool = Field(
        default=True,
        description="The relay keeps spooled events until a worker has applied them (it reads "
        "that from the database) and publishes again what a broker lost. Off: an event leaves "
        "the spool once the broker has it (for a relay that cannot reach the database).",
    )
    broker_visibility_timeout: int = Field(
        default=3600, ge=5, description="Seconds before Redis redelivers an unacknowledged task."
    )
    signing_key_file: Path | None = Field(
        default=None,
        description="The key file (openacct keys generate) that signs what this process sends and checks "
        "what the workers receive: the relay's holds a scheduler key, an administrator's an admin key, "
        "the workers' every key that may send them messages.",
    )
    allow_unsigned: bool = Field(
        default=False,
        description="Send and accept unsigned messages: anyone who can reach the broker could then charge, "
        "refund or report. Only for a bench where nobody else can.",
    )
    worker_remote_control: bool = Field(
        default=False,
        description="Let the broker's remote-control commands stop or reconfigure workers (shutdown, "
        "pool_restart, rate_limit, revoke, …). Off: anyone who can reach the broker could send them; "
        "the read-only ones Flower uses (ping, stats, active, registered, …) always answer.",
    )
    max_deliveries: int = Field(
        default=5, ge=1, le=100, description="Deliveries of one batch before its events are parked."
    )
    admission_policy: Literal["reject", "allow", "notify"] = Field(
        default="reject",
        description="What admission control does with a job whose most cost its account cannot "
        "cover within its credit limit: reject it, allow it (holding what fits), or notify only "
        "(holding it all). Systems and accounts may set their own (openacct admission policy).",
    )
    admission_socket: Path | None = Field(
        default=None,
        description="Unix socket of `openacct admission serve`, which PrologSlurmctld asks before "
        "a job starts. Unset: no admission control; the prolog only records the start.",
    )
    admission_timeout: float = Field(
        default=3.0, ge=0.2, le=30,
        description="Seconds the prolog waits, all told, for the job's details and the decision.",
    )
    admission_on_error: Literal["open", "closed"] = Field(
        default="open",
        description="When the decision cannot be had in time (database or service down): let "
        "the job start (open) or keep it from starting (closed).",
    )
    admission_unlimited_minutes: int = Field(
        default=7 * 24 * 60, ge=1, le=400 * 24 * 60,
        description="The time limit a job without one is priced at.",
    )
    hold_grace: int = Field(
        default=3600, ge=0,
        description="Seconds past a job's time limit after which its hold expires if the job never reported back.",
    )
    statement_settle: int = Field(
        default=600, ge=0, le=86_400,
        description="Seconds: issued monthly statements count what was posted up to this long before they "
        "were issued (longer than any writer's transaction lasts); later postings show in the next "
        "statement as late.",
    )
    hold_expiry_interval: int = Field(
        default=300, ge=10, description="Seconds between the reporter's runs that expire stale holds.",
    )
    slurm_end_hook: Literal["jobcomp", "epilogctld"] = Field(
        default="jobcomp",
        description="Which hook reports Slurm jobs' ends, for `slurm reconcile`: jobcomp (jobcomp/script) "
        "or epilogctld (EpilogSlurmctld, set-up 3): the id a lost job's event is published under.",
    )
    slurm_bin_dir: str = Field(
        default="/usr/bin", description="Where scontrol and sacct are (Slurm's hooks run without a PATH)."
    )
    timezone: str = Field(
        default="UTC", description="Zone for dates and times given without an offset."
    )
    money_places: int = Field(
        default=2, ge=0, le=6,
        description="Decimal places amounts of money are shown with in tables, text and HTML (rounded half "
        "to even, for display only: the ledger, --json and CSV keep the exact amount, to 6 places).",
    )
    alert_thresholds: list[float] = Field(
        default=[0.5, 0.9, 1.0],
        description="Fractions of a project's allocations used at which its PI is told, once each.",
    )
    alert_expiry_days: list[int] = Field(
        default=[30, 7, 0], description="Days before an allocation ends at which its PI is told, once each."
    )
    alert_interval: int = Field(default=900, ge=60, description="Seconds between the reporter's alert runs.")
    rollup_schedule: str = Field(
        default="15 * * * *", description="When beat has the usage rollup run: a cron line (minute hour day month weekday)."
    )
    statements_schedule: str = Field(
        default="0 2 1 * *", description="When beat has last month's statements written: a cron line."
    )
    reconcile_schedule: str | None = Field(
        default=None,
        description="When beat has `openacct slurm reconcile` run (it charges jobs whose jobcomp record "
        "was lost): a cron line. Unset: never. The reporter worker that runs it needs sacct.",
    )
    reconcile_lookback: int = Field(
        default=2 * 24 * 3600, ge=600, le=400 * 24 * 3600,
        description="Seconds back from now in which each scheduled reconcile looks for ended jobs.",
    )
    slurm_limits: bool = Field(
        default=False,
        description="Limits mode: keep each Slurm account's GrpTRESMins (billing) in step with what its "
        "OpenAcct account can pay (`openacct slurm limits`); deposits and transfers from the CLI, and refunds, "
        "update them at once. Needs sacctmgr and scontrol where those run (docs/slurm.md, Limits mode).",
    )
    slurm_limits_schedule: str | None = Field(
        default=None,
        description="When beat has `openacct slurm limits` run: a cron line. Unset: never. The reporter "
        "worker that runs it needs Slurm's client tools and configuration.",
    )
    slurm_billing_minute_price: dict[str, Decimal] = Field(
        default={},
        description="The price of one Slurm billing minute per system, such as {cluster = 0.001}, for limits "
        "mode. Unset for a system: its core-hour rate / 60, where Slurm's billing is CPUs and OpenAcct "
        "charges CPUs alone (no GPU or node service, no multipliers, no TRESBillingWeights).",
    )
    smtp_url: str | None = Field(
        default=None, description="smtp://host:port (or smtps://) to send alerts by email; unset: no email."
    )
    alert_from: str = Field(default="openacct@localhost", description="Sender of alert emails.")
    alert_webhook_url: str | None = Field(
        default=None, description="http(s) URL that receives each alert as a JSON POST; unset: none."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How workers, beat, the relay and admission log: text lines, or json (one object per "
        "line with time, level, logger, message, and the event id, job id and task id where known).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Address the Prometheus metrics of --metrics-port listen on: this host only unless "
        "set (0.0.0.0 for every interface, for a Prometheus elsewhere).",
    )
    api_url: str | None = Field(
        default=None,
        description="URL of `openacct api serve` (https://accounting.example.org) that the user commands on a "
        "login node ask (openacct balance, job cost, estimate), with no database credentials.",
    )
    api_admins: list[str] = Field(
        default=[],
        description="User names the API treats as administrators: they see and manage every project.",
    )
    api_sso_header: str | None = Field(
        default=None,
        description="Request header in which the center's single sign-on reverse proxy names the signed-in "
        "user (X-Remote-User). Believed only from api_trusted_proxies; unset: no SSO.",
    )
    api_trusted_proxies: list[str] = Field(
        default=[],
        description="Addresses (IPs or CIDRs) of the SSO proxies whose api_sso_header the API believes.",
    )
    munge_socket: Path | None = Field(
        default=None,
        description="Socket of the munged that `munge` and `unmunge` talk to, where the site's is not MUNGE's "
        "default (/run/munge/munge.socket.2): for the user commands' credentials and the API's check of them.",
    )
    debug: bool = False

    @field_validator("alert_thresholds")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in values):
            raise ValueError("each threshold is a fraction used, above 0 and at most 1 (0.9 is 90 %)")
        return sorted(set(values))

    @field_validator("alert_expiry_days")
    @classmethod
    def _days(cls, values: list[int]) -> list[int]:
        if any(v < 0 or v > 3650 for v in values):
            raise ValueError("each is a number of days from 0 to 3650")
        return sorted(set(values), reverse=True)

    @field_validator("rollup_schedule", "statements_schedule", "reconcile_schedule", "slurm_limits_schedule")
    @classmethod
    def _cron(cls, line: str | None, info: Any) -> str | None:
        if info.field_name in ("reconcile_schedule", "slurm_limits_schedule") and not (line or "").strip():
            return None  # unset: no scheduled run
        assert line is not None
        fields = line.split()
        if len(fields) != 5:
            raise ValueError("must be a cron line of five fields: minute hour day-of-month month day-of-week")
        from shared.celery_app import cron

        try:
            cron(line)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"is not a cron line celery reads: {exc}") from None
        return " ".join(fields)

    @field_validator("slurm_billing_minute_price")
    @classmethod
    def _minute_prices(cls, prices: dict[str, Decimal]) -> dict[str, Decimal]:
        for system, price in prices.items():
            if not price.is_finite() or price <= 0:
                raise ValueError(f"the price of a billing minute on {system!r} must be above 0, not {price}")
        return prices

    @field_validator("smtp_url", "alert_webhook_url")
    @classmethod
    def _url(cls, url: str | None, info: Any) -> str | None:
        if not url:
            return None
        schemes = ("smtp://", "smtps://") if info.field_name == "smtp_url" else ("http://", "https://")
        if not url.startswith(schemes):
            raise ValueError(f"must start with {' or '.join(schemes)}")
        return url

    @field_validator("api_trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        from shared import networks

        networks.parse(values)
        return values

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        from urllib.parse import urlsplit

        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        # A login node sends a token or a MUNGE credential with every request: in the clear only
        # to this host's loopback (a test, a tunnel), never across the network.
        if url.startswith("http://") and urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("must be https:// (credentials go with every request); http:// only to this host")
        return url.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, url: str | None) -> str | None:
        if url is None:
            return None
        _refuse_empty("OPENACCT_DATABASE_URL", url, "database", "postgresql://")
        if not url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("must be a PostgreSQL URL (postgresql://user@host:port/dbname)")
        return url

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str | None) -> str | None:
        if url is None:
            return None
        _refuse_empty("OPENACCT_BROKER_URL", url, "Redis", "redis:// or amqp://")
        if not url.startswith(("redis://", "rediss://", "redis+socket://", "amqp://", "amqps://")):
            raise ValueError("must be a redis://, redis+socket:// or amqp:// URL")
        return url

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}") from None
        return name

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @field_validator("refund_states")
    @classmethod
    def _refund_fractions(cls, states: dict[str, Decimal]) -> dict[str, Decimal]:
        from shared.events import JOB_STATES

        for state, fraction in states.items():
            if state not in JOB_STATES:
                raise ValueError(f"unknown job state {state}: one of {', '.join(JOB_STATES)}")
            if not 0 < fraction <= 1:
                raise ValueError(f"the refund for {state} is a fraction above 0 and at most 1, not {fraction}")
        return states

    @field_validator("free_states")
    @classmethod
    def _known_states(cls, states: list[str]) -> list[str]:
        from shared.events import JOB_STATES

        states = [s.strip().upper() for s in states]
        unknown = [s for s in states if s not in JOB_STATES]
        if unknown:  # a typo here would silently charge the jobs it meant to spare
            raise ValueError(f"unknown job state(s) {', '.join(unknown)}: one of {', '.join(JOB_STATES)}")
        return states

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _refuse_empty(variable: str, url: str, embedded: str, schemes: str) -> None:
    """An empty URL is a mistake (an unset variable in a unit or compose file, an export without
    a value), not a wish for the embedded server: only leaving it unset asks for that."""
    if not url.strip():
        raise ValueError(f"{variable} is set but empty: unset it for the embedded {embedded}, "
                         f"or give a {schemes} URL")


def _no_secrets_for_everyone(path: Path) -> None:
    """A config file every user may read (the hooks' config is one) holds no password: each
    service takes its URLs from an environment file only root reads (deploy/env/)."""
    from urllib.parse import urlsplit

    from shared.errors import ConfigError

    if not path.stat().st_mode & 0o004:
        return
    for name, value in tomllib.loads(path.read_text()).items():
        if name.endswith("_url") and isinstance(value, str) and (
                urlsplit(value).password or "password=" in urlsplit(value).query):
            raise ConfigError(f"config file {path} is readable by every user and {name} in it holds a password: "
                              "put that URL in the service's environment file (deploy/env/), or chmod o-r the file")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    from pydantic import ValidationError

    from shared.errors import ConfigError

    path = config_file()
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} (from OPENACCT_CONFIG) does not exist")
    try:
        settings = Settings()
        if path is not None:
            _no_secrets_for_everyone(path)
        return settings
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
