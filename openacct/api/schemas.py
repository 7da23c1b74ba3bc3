"""What the API takes and gives, as pydantic models: the OpenAPI document is generated from them.
Money is a string holding the exact decimal (``"1000.00"``, ``"0.061725"``): JSON numbers are
floats to most clients. Signs follow one rule everywhere: money in positive, money out negative."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.events import NAME

Money = str


class Request(BaseModel):
    # A wrong JSON type is an error (no "60" for 60), and so is a field the endpoint does not know.
    model_config = ConfigDict(strict=True, extra="forbid")


def _name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError("not a valid name: 1 to 64 letters, digits, '.', '_', '-', '@' or '+', "
                         "starting with a letter or digit")
    return value


# A system, user, project, account, partition or QoS name, checked as everywhere in OpenAcct.
Name = Annotated[str, Field(max_length=64), AfterValidator(_name)]


class UserIn(Request):
    user: Name = Field(description="A user name.")


class QuoteIn(Request):
    account: Name = Field(description="The account (or project) the job would run under.")
    minutes: int = Field(ge=1, le=400 * 24 * 60, description="Its time limit.")
    cpus: int = Field(default=1, ge=0, le=10_000_000)
    gpus: int = Field(default=0, ge=0, le=10_000_000)
    nodes: int = Field(default=0, ge=0, le=10_000_000)
    partition: Name | None = Field(default=None, description="Its multiplier applies.")
    qos: Name | None = Field(default=None, description="Its multiplier applies.")
    system: Name | None = Field(default=None, description="Default: the server's default_system.")


class LimitIn(Request):
    cap: Money = Field(max_length=40, description='The most the member may spend per period, an exact decimal '
                                                  'string ("100.00"; "0": nothing that costs money).')
    period: Literal["month", "allocation"] = Field(
        default="month", description="month: the calendar month (UTC), as statements count; allocation: "
                                     "while the project's allocations in force last.")


class Balance(BaseModel):
    allocated: Money
    charged: Money
    refunded: Money
    held: Money
    available: Money
    credit_limit: Money


class MemberLimit(BaseModel):
    """A member's cap in a project (``shared/member_limits.py``) and what counts against it now."""

    project: str
    user: str
    period: Literal["month", "allocation"]
    since: dt.datetime = Field(description="When the period began.")
    until: dt.datetime | None = Field(description="When it ends; null: while the allocations in force last.")
    cap: Money
    charged: Money = Field(description="Their charges effective in the period, as re-priced, less refunds.")
    held: Money = Field(description="What their running jobs hold now.")
    spent: Money = Field(description="charged + held.")
    left: Money = Field(description="cap - spent; negative once past the cap.")
    set_at: dt.datetime
    set_by: str


class ProjectSummary(Balance):
    name: str
    pi: str
    expires_at: dt.datetime | None = Field(
        description="When the allocation in force that ends last ends; null: none in force, or one without an end.")
    my_limit: MemberLimit | None = Field(description="The caller's own spending limit in the project; null: none.")


class Me(BaseModel):
    user: str
    full_name: str
    email: str
    admin: bool
    scope: Literal["read", "manage"]
    via: Literal["token", "sso", "munge", "session"]
    projects: list[str]


class Member(BaseModel):
    user: str
    full_name: str
    pi: bool
    manager: bool


class AccountOut(BaseModel):
    name: str
    default: bool
    active: bool
    expires_at: dt.datetime | None
    services: list[str]


class AllocationOut(BaseModel):
    id: int
    account: str
    amount: Money
    credit_limit: Money
    starts_at: dt.datetime
    ends_at: dt.datetime | None
    in_force: bool


class ProjectDetail(BaseModel):
    name: str
    pi: str
    description: str
    active: bool
    members: list[Member]
    managers: list[str]
    accounts: list[AccountOut]
    allocations: list[AllocationOut]
    balance: Balance
    expires_at: dt.datetime | None
    limits: list[MemberLimit] = Field(description="Members' spending limits: every capped member's for those "
                                                  "who see every member, else the caller's own (if any).")
    you_manage: bool = Field(description="Whether the caller may manage membership (their scope aside).")
    you_see_every_member: bool = Field(description="Whether usage, jobs and limits show every member's, or the "
                                                   "caller's only.")


class UsageRow(BaseModel):
    user: str | None = None
    month: str | None = None
    day: dt.date | None = None
    account: str | None = None
    service: str | None = None
    system: str | None = None
    jobs: int
    quantity: str | None = Field(default=None, description="In the service's units (only when by service).")
    charged: Money
    refunded: Money
    net: Money


class Usage(BaseModel):
    project: str
    first: dt.date = Field(alias="from")
    last: dt.date = Field(alias="to")
    by: list[str]
    only_user: str | None = Field(description="Set when the caller sees their own usage only.")
    rows: list[UsageRow]

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class TransactionOut(BaseModel):
    id: int
    kind: str
    amount: Money
    service: str | None
    quantity: str | None
    rate: str | None
    effective_at: dt.datetime
    description: str
    details: dict[str, Any] = Field(
        description="What the writer recorded: for the charger's charges, count, elapsed_seconds, state, policy, "
                    "multiplier, partition_multiplier, qos_multiplier, resource, service and event_id.")


class JobSummary(BaseModel):
    system: str
    job_id: str
    array_job_id: str | None
    array_task_id: int | None
    het_offset: int | None
    user: str | None
    account: str | None
    project: str | None
    partition: str | None
    qos: str | None
    state: str | None
    submit_time: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None
    cpus: int | None
    gpus: int | None
    node_count: int | None
    time_limit_minutes: int | None
    cost: Money = Field(description="What it was charged, less refunds, re-rated where it was (positive).")


class JobDetail(JobSummary):
    exit_code: int | None
    memory_mb: int | None
    node_list: str | None
    charge_policy: str | None = Field(description="Why it was charged as it was.")
    transactions: list[TransactionOut]


class Membership(BaseModel):
    project: str
    user: str
    member: bool


class Management(BaseModel):
    project: str
    user: str
    manager: bool


class LimitCleared(BaseModel):
    project: str
    user: str
    limited: bool = Field(description="false: the member may spend what the project has.")


class QuoteLine(BaseModel):
    resource: str
    service: str
    count: int
    hours: str
    quantity: str
    rate: str
    multiplier: str
    cost: Money


class Quote(BaseModel):
    account: str
    system: str
    minutes: int
    total: Money
    available: Money
    credit_limit: Money
    affordable: bool
    lines: list[QuoteLine]


class Error(BaseModel):
    error: str
