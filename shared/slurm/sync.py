"""Make Slurm's accounts and user associations match OpenAcct's projects and members.

``plan`` compares what OpenAcct has (active projects and their members) with what ``sacctmgr``
lists for one cluster and returns the ``sacctmgr`` commands that close the gap: accounts and
associations to add, associations to remove. Slurm accounts that OpenAcct does not know are left
alone (a site may keep some of its own), and so is ``root``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput
from shared.events import NAME  # safe as a sacctmgr word, unquoted
from shared.models import Project, ProjectMember, User

SACCTMGR_TIMEOUT = 60


@dataclass(frozen=True)
class Wanted:
    accounts: dict[str, str]  # project -> description
    members: set[tuple[str, str]]  # (project, user)


def wanted(session: Session) -> Wanted:
    projects = dict(session.execute(select(Project.name, Project.description).where(Project.active)).all())
    members = set(session.execute(
        select(Project.name, User.name).join(ProjectMember, ProjectMember.project_id == Project.id)
        .join(User, User.id == ProjectMember.user_id).where(Project.active, User.active)).all())
    return Wanted(projects, {(p, u) for p, u in members})


def parse_associations(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Accounts and (account, user) associations from ``sacctmgr -nP show associations
    format=account,user``: one ``account|user`` line each, user empty for the account's own."""
    accounts: set[str] = set()
    users: set[tuple[str, str]] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        account, _, user = line.strip().partition("|")
        accounts.add(account)
        if user:
            users.add((account, user))
    return accounts, users


def plan(want: Wanted, have_accounts: set[str], have_users: set[tuple[str, str]], cluster: str) -> list[list[str]]:
    """The sacctmgr commands (argument lists, no shell) that make Slurm match ``want``."""
    for name in [*want.accounts, *(u for _, u in want.members)]:
        if not NAME.fullmatch(name):
            raise InvalidInput(f"{name!r} cannot be a Slurm account or user name")
    commands = []
    for project in sorted(set(want.accounts) - have_accounts):
        description = re.sub(r"[^\w .,()-]", "", want.accounts[project])[:100] or project
        commands.append(["sacctmgr", "-i", "add", "account", project, f"cluster={cluster}",
                         f"description={description}", f"organization={project}"])
    for project, user in sorted(want.members - have_users):
        commands.append(["sacctmgr", "-i", "add", "user", user, f"account={project}", f"cluster={cluster}"])
    for project, user in sorted(have_users - want.members):
        if project in want.accounts:  # only the accounts OpenAcct manages
            commands.append(["sacctmgr", "-i", "remove", "user", user, "where", f"account={project}",
                             f"cluster={cluster}"])
    return commands


def slurm_associations(cluster: str) -> tuple[set[str], set[tuple[str, str]]]:
    sacctmgr = shutil.which("sacctmgr")
    if sacctmgr is None:
        raise InvalidInput("sacctmgr is not on PATH: run this where Slurm's client tools are")
    result = subprocess.run([sacctmgr, "-nP", "show", "associations", f"cluster={cluster}", "format=account,user"],
                            capture_output=True, text=True, timeout=SACCTMGR_TIMEOUT)
    if result.returncode != 0:
        raise InvalidInput(f"sacctmgr failed: {result.stderr.strip() or result.stdout.strip()}")
    accounts, users = parse_associations(result.stdout)
    accounts.discard("root")
    return accounts, {(a, u) for a, u in users if a != "root"}
