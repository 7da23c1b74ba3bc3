"""Event contracts: what hooks publish and workers consume. Versioned; JSON Schema in
``shared/schemas/`` (``openacct events schema`` writes it) for hooks in other languages.

Every event is one flat JSON object with ``schema_version``, ``kind`` and ``event_id``. Job
events carry what schedulers give; their id is derived from the job (``shared.event_id``), and
an event whose id does not match its job is refused, so a replayed or forged id cannot shadow
another job's charge.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from shared.event_id import job_event_id
from shared.timestamps import CLOCK_SKEW

SCHEMA_VERSION = 1
# Clocks on cluster nodes drift; an event this far in the future is still plausible.
LONGEST_JOB = dt.timedelta(days=400)
# An event is a few hundred bytes. The relay refuses bigger spool files with the same limit
# (``shared.spool.MAX_EVENT_BYTES``); the charger refuses them from any other way in.
MAX_EVENT_BYTES = 256 * 1024

JOB_STATES = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
    "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REQUEUED", "SUSPENDED",
    "REVOKED", "SPECIAL_EXIT",
)

# What a name of a system, user, project or account is, everywhere (match it whole: fullmatch;
# Python's "$" would let a trailing newline through).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")]
OptionalName = Annotated[str | None, Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._@+-]*$")]
JobId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
# Strict: a count must be a JSON integer, not "4" or true, so nothing is charged by accident.
Count = Annotated[int, Field(ge=0, le=10_000_000, strict=True)]


EARLIEST = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)


def _plausible(name: str, value: dt.datetime, latest: dt.datetime) -> dt.datetime:
    """``value`` in UTC, or ValueError naming the field."""
    if value.tzinfo is None:
        raise ValueError(f"{name}: must carry a time zone (an offset or Z), or be epoch seconds")
    # Converted first: bounds in UTC compare field by field, where the parser's offset would
    # have every comparison ask it for the offset (a third of the charger's parsing). A time so
    # near year 1 or 9999 that UTC cannot hold it is out of bounds all the same.
    try:
        utc = value.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST <= utc <= latest:
        raise ValueError(f"{name}: is not a plausible time (before 1990 or in the future)")
    return utc


# Every time of an event must carry its zone and be plausible, and is kept in UTC: Event._checked
# sees to each field of this type.
Time = dt.datetime


def _is_time(annotation: Any) -> bool:
    """Whether a field holds a time: a datetime, alone, annotated or in a union."""
    if annotation is dt.datetime:
        return True
    if get_origin(annotation) is Annotated:
        return _is_time(get_args(annotation)[0])
    return get_origin(annotation) in (Union, UnionType) and any(_is_time(a) for a in get_args(annotation))


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    schema_version: Literal[1] = Field(description="Contract version; others are refused.")
    event_id: str = Field(min_length=1, max_length=200)
    emitted_at: Time | None = None
    source: str = Field(default="", max_length=64, description="What produced it: slurm-jobcomp, publish, …")

    # The names of the Time fields, found once per class.
    _times: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._times = tuple(name for name, f in cls.model_fields.items() if _is_time(f.annotation))

    @model_validator(mode="after")
    def _checked(self) -> Self:
        # One validator once the fields are valid, not one per rule: each call pydantic makes back
        # into Python costs about what its check does, and the charger and publish parse every event.
        fields = self.__dict__  # frozen to its readers, not to its own validation
        latest = dt.datetime.now(dt.UTC) + CLOCK_SKEW
        problems = []
        for name in self._times:
            if isinstance(value := fields[name], dt.datetime):
                try:
                    fields[name] = _plausible(name, value, latest)
                except ValueError as exc:
                    problems.append(str(exc))
        if problems:  # each bad time, as pydantic tells each bad field
            raise ValueError("; ".join(problems))
        self._check()
        return self

    def _check(self) -> None:
        """A kind's rules beyond its fields' types, its times already in UTC: ValueError says why."""


class JobFields(Event):
    system: Name
    job_id: JobId
    array_job_id: JobId | None = None
    array_task_id: Annotated[int, Field(ge=0, le=10_000_000, strict=True)] | None = None
    het_offset: Annotated[int, Field(ge=0, le=100_000, strict=True)] | None = None
    name: str | None = Field(default=None, max_length=256)
    user: Name
    account: OptionalName
    partition: OptionalName
    qos: OptionalName
    submit_time: Time | None = Field(
        default=None, description="Required unless start_time is given (Slurm's ctld hooks lack it)."
    )
    start_time: Time | None = None
    node_count: Count | None = None
    node_list: str | None = Field(default=None, max_length=65_536, pattern=r"^[A-Za-z0-9_.,\[\]-]*$")
    cpus: Count | None = None
    gpus: Count | None = None
    memory_mb: Annotated[int, Field(ge=0, le=10**12, strict=True)] | None = None
    time_limit_minutes: Annotated[int, Field(ge=0, le=10**8, strict=True)] | None = None

    def _check(self) -> None:
        if self.submit_time is None and self.start_time is None:
            raise ValueError("a job event needs submit_time or start_time")
        expected = self.expected_id()
        if self.event_id != expected:
            raise ValueError(f"event_id {self.event_id!r} does not match its job (expected {expected!r})")

    def expected_id(self) -> str:
        def epoch(t: dt.datetime | None) -> int | None:
            return None if t is None else int(t.timestamp())

        return job_event_id(self.kind, self.system, self.job_id, self.array_task_id,  # type: ignore[attr-defined]
                            self.het_offset, epoch(self.submit_time), epoch(self.start_time))


class JobStarted(JobFields):
    kind: Literal["job.started"]


class JobCompleted(JobFields):
    kind: Literal["job.completed"]
    end_time: Time
    start_time: Time | None = None
    state: str = Field(max_length=32)
    exit_code: Annotated[int, Field(ge=-1024, le=1024, strict=True)] | None = None

    def _check(self) -> None:
        # Slurm says "CANCELLED by 1000": the state is its first word
        state = self.state.upper().split()[0] if self.state.strip() else self.state
        if state not in JOB_STATES:
            raise ValueError(f"state: unknown job state {self.state!r}")
        self.__dict__["state"] = state
        super()._check()
        start = self.start_time or self.end_time
        if self.submit_time is not None and start < self.submit_time:
            raise ValueError("start_time is before submit_time")
        if self.end_time < start:
            raise ValueError("end_time is before start_time")
        if self.end_time - start > LONGEST_JOB:
            raise ValueError(f"the job ran longer than {LONGEST_JOB.days} days")



class RefundRequested(Event):
    """Refund a job's charges or one transaction: in full, an amount, or a fraction."""

    kind: Literal["refund.requested"]
    system: Name | None = None
    job_id: JobId | None = None
    submit_time: Time | None = None
    transaction_id: Annotated[int, Field(ge=1, strict=True)] | None = None
    amount: Annotated[Decimal, Field(gt=0, max_digits=24, decimal_places=6)] | None = None
    fraction: Annotated[Decimal, Field(gt=0, le=1, decimal_places=6)] | None = None
    reason: str = Field(min_length=1, max_length=2000)
    requester: str = Field(min_length=1, max_length=64)

    def _check(self) -> None:
        if (self.transaction_id is None) == (self.job_id is None):
            raise ValueError("name exactly one of transaction_id or job_id")
        if self.job_id is not None and self.system is None:
            raise ValueError("a job refund needs the job's system")
        if self.amount is not None and self.fraction is not None:
            raise ValueError("give amount or fraction, not both")


class ReportRequested(Event):
    kind: Literal["report.requested"]
    report: Literal["rollup", "statements", "alerts", "usage"]
    params: dict[str, Any] = Field(default_factory=dict)


AnyEvent = Annotated[JobStarted | JobCompleted | RefundRequested | ReportRequested, Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)
KINDS = ("job.started", "job.completed", "refund.requested", "report.requested")


class EventRejected(ValueError):
    """Why a payload is not an acceptable event, in one line a person can act on."""


def parse_event(raw: bytes | str) -> AnyEvent:
    """Validate one raw event, or raise ``EventRejected`` with the precise reason."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_EVENT_BYTES:
        raise EventRejected(f"event of {size} bytes is larger than the {MAX_EVENT_BYTES} bytes an event may have")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventRejected(f"payload is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        raise EventRejected(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("job.", "refund.", "report.")))
        if err["type"] == "union_tag_not_found":
            problems.append(f"kind is missing: it must be one of {', '.join(KINDS)}")
            continue
        if err["type"] == "union_tag_invalid":
            tag = str(err.get("ctx", {}).get("tag", ""))
            problems.append(f"unknown kind {tag[:64]!r}: kind must be one of {', '.join(KINDS)}")
            continue
        if err["type"] == "dict_type" and not where:
            problems.append(f"an event must be a JSON object, not {_json_type(err.get('input'))}")
            continue
        if err["type"] == "literal_error" and where == "schema_version":
            problems.append(f"unsupported schema_version {err.get('input')!r} (this OpenAcct reads {SCHEMA_VERSION})")
            continue
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list"}.get(type(value), type(value).__name__)


def json_schemas() -> dict[str, dict[str, Any]]:
    models: dict[str, type[BaseModel]] = {
        "job.started": JobStarted, "job.completed": JobCompleted,
        "refund.requested": RefundRequested, "report.requested": ReportRequested,
    }
    return {kind: model.model_json_schema() for kind, model in models.items()}
