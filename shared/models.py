"""The shared PostgreSQL schema, as typed SQLAlchemy 2 models.

Money and quantities are NUMERIC with a fixed scale (``Money``), never float. The ledger tables
(``ledger_transactions``, ``ledger_entries``) are append-only: a trigger created by the migrations
refuses UPDATE and DELETE on them. ``account_balances`` is a running total kept by the ledger in
the same database transaction as the entries, and ``openacct ledger verify`` recomputes it.

``jobs``, ``ledger_transactions`` and ``ledger_entries`` are written thousands of rows at a time:
their references (``account_id``, ``job_id``, …) are checked once per statement by triggers, not
by row-level foreign keys, and the rows they refer to are never deleted (migration 0003).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shared.money import MONEY_SCALE, PRECISION, RATE_SCALE

Money = Numeric(PRECISION, MONEY_SCALE)
Quantity = Numeric(PRECISION, MONEY_SCALE)
Rate = Numeric(PRECISION, RATE_SCALE)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TRANSACTION_KINDS = ("deposit", "charge", "refund", "hold", "release", "transfer", "adjustment")
# What an entry moves. available = allocated - charged + refunded - held.
BUCKETS = ("allocated", "charged", "refunded", "held")
# What admission control does with a job its account cannot cover (see services/admission).
ADMISSION_POLICIES = ("reject", "allow", "notify")
MEMBERSHIP_EVENTS = ("added", "removed", "pi_changed")
# What a member's spending limit in a project counts: a calendar month (UTC, as statements), or
# the project's allocations in force (see shared/member_limits.py).
LIMIT_PERIODS = ("month", "allocation")
# What an API token lets its holder do: read, or read and manage (membership, managers).
TOKEN_SCOPES = ("read", "manage")

Timestamp = DateTime(timezone=True)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class System(Base):
    __tablename__ = "systems"
    __table_args__ = (
        CheckConstraint(_one_of("admission_policy", ADMISSION_POLICIES), name="admission_policy"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    # None: the site's admission_policy setting.
    admission_policy: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    services: Mapped[list[Service]] = relationship(back_populates="system")

    def __repr__(self) -> str:
        return f"<System {self.name}>"


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (UniqueConstraint("system_id", "name", name="uq_services_system_name"),)

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    system_id: Mapped[int] = mapped_column(ForeignKey("systems.id"))
    name: Mapped[str] = mapped_column(String(64))
    units: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    system: Mapped[System] = relationship(back_populates="services")
    rates: Mapped[list[ServiceRate]] = relationship(
        back_populates="service", order_by="ServiceRate.effective_from"
    )

    def __repr__(self) -> str:
        return f"<Service {self.name} on {self.system_id}>"


class ServiceRate(Base):
    """Charge per unit of a service, from ``effective_from`` until the next rate's start."""

    __tablename__ = "service_rates"
    __table_args__ = (
        UniqueConstraint("service_id", "effective_from", name="uq_service_rates_service_from"),
        CheckConstraint("rate >= 0", name="rate_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    rate: Mapped[Decimal] = mapped_column(Rate)
    effective_from: Mapped[dt.datetime] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    service: Mapped[Service] = relationship(back_populates="rates")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    full_name: Mapped[str] = mapped_column(Text, default="", server_default="")
    email: Mapped[str] = mapped_column(Text, default="", server_default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    def __repr__(self) -> str:
        return f"<User {self.name}>"


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (CheckConstraint("parent_id <> id", name="not_own_parent"),)

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    pi_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    pi: Mapped[User] = relationship(foreign_keys=[pi_id])
    parent: Mapped[Project | None] = relationship(remote_side=[id])
    accounts: Mapped[list[Account]] = relationship(back_populates="project", order_by="Account.id")
    members: Mapped[list[ProjectMember]] = relationship(back_populates="project")

    def __repr__(self) -> str:
        return f"<Project {self.name}>"


class ProjectMember(Base):
    """Who is in a project now; ``membership_events`` keeps how it came to be."""

    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    added_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    project: Mapped[Project] = relationship(back_populates="members")
    user: Mapped[User] = relationship()


class MembershipEvent(Base):
    __tablename__ = "membership_events"
    __table_args__ = (CheckConstraint(_one_of("kind", MEMBERSHIP_EVENTS), name="kind"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    actor: Mapped[str] = mapped_column(Text, default="", server_default="")


class ProjectManager(Base):
    """A user the PI named to manage the project's membership with them (NERSC Iris's
    membership manager): they see every member's usage and may add and remove members."""

    __tablename__ = "project_managers"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    added_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    actor: Mapped[str] = mapped_column(Text, default="", server_default="")

    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token of the API. Only the SHA-256 of the secret is kept: the token is shown
    once, when it is made, and a stolen copy of the table lets nobody in."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_one_of("scope", TOKEN_SCOPES), name="scope"),)

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    # None: until revoked.
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    actor: Mapped[str] = mapped_column(Text, default="", server_default="")

    user: Mapped[User] = relationship()


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        # One default account per project: the one that pays when a scheduler names the project.
        Index(
            "uq_accounts_default_per_project",
            "project_id",
            unique=True,
            postgresql_where=text("is_default"),
        ),
        CheckConstraint(_one_of("admission_policy", ADMISSION_POLICIES), name="admission_policy"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    # None: its system's policy, else the site's admission_policy setting.
    admission_policy: Mapped[str | None] = mapped_column(String(16))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    project: Mapped[Project] = relationship(back_populates="accounts")

    def __repr__(self) -> str:
        return f"<Account {self.name}>"


class ServiceGrant(Base):
    """An account may use a service while a grant with no ``revoked_at`` exists."""

    __tablename__ = "service_grants"
    __table_args__ = (
        Index(
            "uq_service_grants_open",
            "account_id",
            "service_id",
            unique=True,
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    granted_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class Allocation(Base):
    """Money deposited into an account, spendable from ``starts_at`` until ``ends_at``.

    Ledger entries that touch an allocation count towards the account's balance only while the
    allocation is in force; unspent money of an expired allocation is no longer available.
    """

    __tablename__ = "allocations"
    __table_args__ = (
        CheckConstraint("amount >= 0", name="amount_not_negative"),
        CheckConstraint("credit_limit >= 0", name="credit_limit_not_negative"),
        CheckConstraint("ends_at IS NULL OR ends_at > starts_at", name="ends_after_start"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    credit_limit: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")
    starts_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    ends_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    account: Mapped[Account] = relationship()


# The charge policy admission control writes on a run it refused (``shared.rating.jobs``). The
# charger asks for such runs every batch: they have an index of their own (migration 0017).
REFUSED_RUN = "refused by admission control: never ran"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_refused_runs", "system_id", "job_id", postgresql_where=text(f"charge_policy = '{REFUSED_RUN}'")),
        # Schedulers reuse job ids (a Slurm restart resets the counter): the submit time and the
        # array/het indices tell two jobs with one id apart.
        Index(
            "uq_jobs_natural_key",
            "system_id",
            "job_id",
            "array_task_id",
            "het_offset",
            "submit_time",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
        CheckConstraint("end_time IS NULL OR start_time IS NULL OR end_time >= start_time",
                        name="ends_after_start"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    system_id: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(64, collation="C"))  # byte order: migration 0019
    array_job_id: Mapped[str | None] = mapped_column(String(64))
    array_task_id: Mapped[int | None] = mapped_column(Integer)
    het_offset: Mapped[int | None] = mapped_column(Integer)
    submit_time: Mapped[dt.datetime] = mapped_column(Timestamp)
    start_time: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    end_time: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    user_id: Mapped[int | None] = mapped_column(Integer)
    account_id: Mapped[int | None] = mapped_column(Integer, index=True)
    partition: Mapped[str | None] = mapped_column(String(64))
    qos: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(String(32))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    node_count: Mapped[int | None] = mapped_column(Integer)
    node_list: Mapped[str | None] = mapped_column(Text)
    cpus: Mapped[int | None] = mapped_column(Integer)
    gpus: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(BigInteger)
    time_limit_minutes: Mapped[int | None] = mapped_column(Integer)
    # Why the job was or was not charged: "charged for elapsed time", "state NODE_FAIL is not charged".
    charge_policy: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    system: Mapped[System] = relationship(primaryjoin="foreign(Job.system_id) == System.id")


class LedgerTransaction(Base):
    """One business event on the ledger. Its money moves in ``ledger_entries``."""

    __tablename__ = "ledger_transactions"
    __table_args__ = (
        CheckConstraint(_one_of("kind", TRANSACTION_KINDS), name="kind"),
        CheckConstraint("amount >= 0", name="amount_not_negative"),
        Index("ix_ledger_transactions_account_effective", "account_id", "effective_at"),
        # only the rows that refer to another (refunds, releases, adjustments): not a NULL per charge
        Index("ix_ledger_transactions_refers_to_id", "refers_to_id", postgresql_where=text("refers_to_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str] = mapped_column(String(200, collation="C"), unique=True)  # byte order: 0019
    request_hash: Mapped[str] = mapped_column(String(64))
    # Size of the transaction, always >= 0; its direction comes from the kind (and the entries).
    amount: Mapped[Decimal] = mapped_column(Money)
    account_id: Mapped[int] = mapped_column(Integer)
    counterparty_account_id: Mapped[int | None] = mapped_column(Integer)
    service_id: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer)
    quantity: Mapped[Decimal | None] = mapped_column(Quantity)
    rate: Mapped[Decimal | None] = mapped_column(Rate)
    # The charge a refund or adjustment reverses, the hold a release frees.
    # (checked per statement, migration 0016: transactions are never deleted)
    refers_to_id: Mapped[int | None] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    actor: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    effective_at: Mapped[dt.datetime] = mapped_column(Timestamp)

    # Loaded with the transaction: callers get it back detached, entries and all.
    entries: Mapped[list[LedgerEntry]] = relationship(
        primaryjoin="LedgerTransaction.id == foreign(LedgerEntry.transaction_id)",
        back_populates="transaction", order_by="LedgerEntry.id", lazy="selectin"
    )


class LedgerEntry(Base):
    """One movement of money in one bucket of one account's allocation (or of the account itself
    when ``allocation_id`` is NULL: holds, and charges that found no allocation in force)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(_one_of("bucket", BUCKETS), name="bucket"),
        Index("ix_ledger_entries_account_bucket", "account_id", "allocation_id", "bucket"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    transaction_id: Mapped[int] = mapped_column(BigInteger, index=True)
    account_id: Mapped[int] = mapped_column(Integer)
    allocation_id: Mapped[int | None] = mapped_column(Integer)
    bucket: Mapped[str] = mapped_column(String(16))
    # Signed: a positive amount grows the bucket, a negative one shrinks it.
    amount: Mapped[Decimal] = mapped_column(Money)
    effective_at: Mapped[dt.datetime] = mapped_column(Timestamp)

    transaction: Mapped[LedgerTransaction] = relationship(
        primaryjoin="LedgerTransaction.id == foreign(LedgerEntry.transaction_id)", back_populates="entries"
    )


class AccountBalance(Base):
    """Running totals of ``ledger_entries`` per account and allocation, kept by the ledger.

    The rules money obeys are checked on every row written, after each statement (migration
    0009; a CHECK constraint would see the upsert's increment, not the total): no allocation ends
    with more than was put into it, nor with less than nothing; the account's own row (what no
    allocation covered) holds no allocated money and is never positive; nothing is held below zero."""

    __tablename__ = "account_balances"
    __table_args__ = (
        Index(
            "uq_account_balances_account_allocation",
            "account_id",
            "allocation_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    allocation_id: Mapped[int | None] = mapped_column(ForeignKey("allocations.id"))
    allocated: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")
    charged: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")
    refunded: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")
    held: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")


class OpenHold(Base):
    """Holds with money still held, kept by the ledger beside the journal (like the running
    totals) so that settling a job's hold or expiring stale ones never scans the journal."""

    __tablename__ = "open_holds"

    hold_id: Mapped[int] = mapped_column(ForeignKey("ledger_transactions.id"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    remaining: Mapped[Decimal] = mapped_column(Money)
    # When it is released if its job never reports back; None: only by hand.
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)

    __table_args__ = (
        Index("ix_open_holds_account_expires", "account_id", "expires_at"),
        Index("ix_open_holds_expires", "expires_at"),
        CheckConstraint("remaining > 0", name="remaining_positive"),
    )


class ProcessedEvent(Base):
    """Inbox: an event id is processed once; the row is written with the event's effect."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(200, collation="C"), primary_key=True)  # byte order: 0019
    kind: Mapped[str] = mapped_column(String(64))
    processed_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class ParkedEvent(Base):
    """Dead letters: an event that could not be applied, kept whole with the reason."""

    __tablename__ = "parked_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[str | None] = mapped_column(String(200), index=True)
    kind: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    # Raw bytes as received: the payload may not even be valid UTF-8.
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str] = mapped_column(Text, default="", server_default="")
    parked_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    replayed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


# --------------------------------------------------------------------------- scheduler mapping

ALIAS_KINDS = ("system", "user", "account")
RESOURCES = ("cpu", "gpu", "node")
MULTIPLIER_KINDS = ("partition", "qos")


class Alias(Base):
    """A name the scheduler uses for an OpenAcct system, user or account, where they differ.
    System aliases are global; user and account aliases belong to one system."""

    __tablename__ = "aliases"
    __table_args__ = (
        CheckConstraint(_one_of("kind", ALIAS_KINDS), name="kind"),
        CheckConstraint("(kind = 'system') = (system_id IS NULL)", name="system_scope"),
        Index("uq_aliases_kind_system_alias", "kind", "system_id", "alias", unique=True,
              postgresql_nulls_not_distinct=True),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    system_id: Mapped[int | None] = mapped_column(ForeignKey("systems.id"))
    alias: Mapped[str] = mapped_column(String(64))
    target_id: Mapped[int] = mapped_column(Integer)


class ResourceService(Base):
    """Which service a job resource is charged to on a system: cpu -> core-hours, and so on.
    Without a row, a system's service whose units are core-hours, gpu-hours or node-hours is used."""

    __tablename__ = "resource_services"
    __table_args__ = (
        CheckConstraint(_one_of("resource", RESOURCES), name="resource"),
        UniqueConstraint("system_id", "resource", name="uq_resource_services_system_resource"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    system_id: Mapped[int] = mapped_column(ForeignKey("systems.id"))
    resource: Mapped[str] = mapped_column(String(16))
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))


class ChargeMultiplier(Base):
    """Jobs in this partition (or QoS) of a system pay ``multiplier`` times the rate."""

    __tablename__ = "charge_multipliers"
    __table_args__ = (
        CheckConstraint(_one_of("kind", MULTIPLIER_KINDS), name="kind"),
        CheckConstraint("multiplier >= 0", name="multiplier_not_negative"),
        UniqueConstraint("system_id", "kind", "name", name="uq_charge_multipliers_system_kind_name"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    system_id: Mapped[int] = mapped_column(ForeignKey("systems.id"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    multiplier: Mapped[Decimal] = mapped_column(Numeric(12, 6))


class TaskDelivery(Base):
    """How often a worker has started a task, and when it was applied: Redis cannot count
    redeliveries, so the workers do, and park a batch that keeps failing instead of retrying it
    forever; the relay lets go of spooled events once their task is applied."""

    __tablename__ = "task_deliveries"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    first_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    # Set in the transaction that applied (or parked) the task's events: what the relay waits for.
    completed_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)


class AlertSent(Base):
    """An alert given once: its key names the project (or allocation), the kind and threshold,
    and the allocations it was about, so the same alert never goes out twice."""

    __tablename__ = "alerts_sent"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    channels: Mapped[str] = mapped_column(Text, default="", server_default="")
    sent_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class UsageDaily(Base):
    """Use per day, system, service, project, account, user and partition, rolled up from the
    ledger by the reporter; a day rolled up again is replaced whole, so it gives the same rows."""

    __tablename__ = "usage_daily"
    __table_args__ = (
        Index("uq_usage_daily_key", "day", "system_id", "service_id", "project_id", "account_id", "user_id",
              "partition", "job_size", unique=True, postgresql_nulls_not_distinct=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date)
    system_id: Mapped[int] = mapped_column(Integer)
    service_id: Mapped[int] = mapped_column(Integer)
    project_id: Mapped[int] = mapped_column(Integer)
    account_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int | None] = mapped_column(Integer)
    partition: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # The job's size class by CPUs ("1", "2-8", …; "" for charges that are not jobs').
    job_size: Mapped[str] = mapped_column(String(16), default="", server_default="")
    jobs: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[Decimal] = mapped_column(Quantity)
    charged: Mapped[Decimal] = mapped_column(Money)
    refunded: Mapped[Decimal] = mapped_column(Money)


class UsageRollup(Base):
    """When each day was last rolled up into ``usage_daily``. A report reads a day from there once
    it was rolled up after it ended and has left the days the reporter still rolls up again; it adds
    up any other day (today's, one never rolled up since it ended) from the ledger as it runs."""

    __tablename__ = "usage_rollups"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    rolled_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class StatementIssued(Base):
    """A statement period whose statements went out: from then on they count only what was
    posted by ``cutoff``, so a sent statement never changes, and what is posted later for the
    period shows in the next statement as a late posting."""

    __tablename__ = "statements_issued"

    period_start: Mapped[dt.datetime] = mapped_column(Timestamp, primary_key=True)
    period_end: Mapped[dt.datetime] = mapped_column(Timestamp, primary_key=True)
    cutoff: Mapped[dt.datetime] = mapped_column(Timestamp)
    issued_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class MemberLimit(Base):
    """The most a member may spend in a project per period (a PI's sub-allocation of the project's
    money): the member's charges in the project's accounts effective in the period, less their
    refunds, plus what their running jobs hold, may not pass ``amount``. Admission control refuses
    a job that would (shared/member_limits.py). It belongs to the membership: removing the member
    removes it."""

    __tablename__ = "member_limits"
    __table_args__ = (
        ForeignKeyConstraint(["project_id", "user_id"], ["project_members.project_id", "project_members.user_id"],
                             ondelete="CASCADE"),
        CheckConstraint("amount >= 0", name="amount_not_negative"),
        CheckConstraint(_one_of("period", LIMIT_PERIODS), name="period"),
    )

    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    amount: Mapped[Decimal] = mapped_column(Money)
    period: Mapped[str] = mapped_column(String(16))
    set_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    actor: Mapped[str] = mapped_column(Text, default="", server_default="")
