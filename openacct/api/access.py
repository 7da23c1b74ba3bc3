"""What a caller may see and do. Every endpoint asks here, and nowhere else.

A user sees the projects they belong to (or lead), with their balances, and their own jobs and
usage; the PI, and the managers the PI names, see every member's and manage membership; an
administrator sees and manages everything. A project the caller may not see answers exactly as
one that does not exist: its existence and its balance never leak.
"""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy import ColumnElement, Select, and_, exists, or_, select, true
from sqlalchemy.orm import Session

from openacct.api.auth import Caller
from shared.events import NAME
from shared.models import Account, Job, Project, ProjectManager, ProjectMember


def invalid_name(what: str) -> HTTPException:
    return HTTPException(422, f"{what} name is not valid: 1 to 64 letters, digits, '.', '_', '-', '@' or '+', "
                              "starting with a letter or digit")


def _visible(caller: Caller) -> ColumnElement[bool]:
    """The condition on Project of the projects the caller may see."""
    if caller.admin:
        return true()
    member = exists().where(ProjectMember.project_id == Project.id, ProjectMember.user_id == caller.user_id)
    return or_(Project.pi_id == caller.user_id, member)


def visible_projects(session: Session, caller: Caller) -> list[Project]:
    return list(session.scalars(select(Project).where(_visible(caller)).order_by(Project.name)))


def project_for(session: Session, caller: Caller, name: str) -> Project:
    """The project, or 404 with the same words whether it does not exist or is not the caller's."""
    if not NAME.fullmatch(name):
        raise invalid_name("project")
    project = session.scalar(select(Project).where(Project.name == name, _visible(caller)))
    if project is None:
        raise HTTPException(404, f"no project {name} that you can see")
    return project


def may_manage(session: Session, caller: Caller, project: Project) -> bool:
    """Whether the caller is the project's PI, a manager the PI named, or an administrator.
    (A token of scope read still may not change anything: ``require_manage``.)"""
    if caller.admin or project.pi_id == caller.user_id:
        return True
    return session.get(ProjectManager, (project.id, caller.user_id)) is not None


def require_manage(session: Session, caller: Caller, project: Project) -> None:
    """403 for a caller who can see the project but not manage it, or whose token only reads."""
    if not may_manage(session, caller, project):
        raise HTTPException(403, f"only the PI of project {project.name}, a manager the PI named, "
                                 "or an administrator may do this")
    if caller.scope != "manage":
        raise HTTPException(403, "this token may only read: make one with `openacct token create USER "
                                 "--scope manage`")


def sees_every_member(session: Session, caller: Caller, project: Project) -> bool:
    """Whether the caller sees all members' jobs and usage in the project, not only their own.
    Seeing is not managing: a read token of the PI sees as much as the PI."""
    return may_manage(session, caller, project)


def managed_projects(caller: Caller) -> Select[tuple[int]]:
    """The ids of the projects the caller leads or manages, as a subquery."""
    named = select(ProjectManager.project_id).where(ProjectManager.user_id == caller.user_id)
    return select(Project.id).where(or_(Project.pi_id == caller.user_id, Project.id.in_(named)))


def visible_jobs(session: Session, caller: Caller, project: Project | None = None) -> ColumnElement[bool]:
    """The condition on Job of the jobs the caller may see (in ``project``, if given): their own,
    and every job of the projects they lead or manage; an administrator's, all."""
    in_project = [] if project is None else [Job.account_id.in_(select(Account.id).where(Account.project_id == project.id))]
    if caller.admin or (project is not None and may_manage(session, caller, project)):
        return and_(true(), *in_project)
    managed = Job.account_id.in_(select(Account.id).where(Account.project_id.in_(managed_projects(caller))))
    return and_(or_(Job.user_id == caller.user_id, managed), *in_project)


def account_for(session: Session, caller: Caller, name: str) -> Account:
    """An account (or a project's default account) of a project the caller may see; 404 alike
    for one that does not exist and one that is not theirs."""
    if not NAME.fullmatch(name):
        raise invalid_name("account")
    account = session.scalar(select(Account).where(Account.name == name)) or session.scalar(
        select(Account).join(Project, Project.id == Account.project_id)
        .where(Project.name == name, Account.is_default))
    if account is None or session.scalar(select(Project.id).where(Project.id == account.project_id,
                                                                  _visible(caller))) is None:
        raise HTTPException(404, f"no account {name} that you can see")
    return account
