"""The README's quick start, run as written through ``openacct shell``, leaves exactly its state."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from shared.models import (
    Account,
    MembershipEvent,
    Project,
    ProjectMember,
    Service,
    ServiceGrant,
    ServiceRate,
    System,
    User,
)
from tests.conftest import QUICKSTART

OPENACCT = [sys.executable, "-m", "openacct"]


def openacct(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OPENACCT, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_quickstart_through_the_shell_leaves_exactly_its_state(committed: Engine) -> None:
    result = openacct("shell", stdin=QUICKSTART.read_text())
    assert result.returncode == 0, result.stderr

    with Session(committed) as s:
        assert [(x.name, x.description) for x in s.scalars(select(System))] == [("cluster", "A Cluster")]
        (service,) = s.scalars(select(Service)).all()
        assert (service.name, service.units, service.system.name) == ("cluster-core-hours", "core-hours", "cluster")
        assert service.description == "CPU core usage * wallclock hours"
        assert [r.rate for r in s.scalars(select(ServiceRate))] == [Decimal("0.05")]
        assert sorted(s.scalars(select(User.name))) == ["bob", "sue", "tux"]
        projects = {p.name: (p.pi.name, p.description, p.active) for p in s.scalars(select(Project))}
        assert projects == {"phys": ("bob", "Physics Dept", True), "chem": ("sue", "Chemistry Dept", True)}
        members = {
            (p, u)
            for p, u in s.execute(
                select(Project.name, User.name)
                .join(ProjectMember, ProjectMember.project_id == Project.id)
                .join(User, User.id == ProjectMember.user_id)
            )
        }
        assert members == {("phys", "bob"), ("phys", "tux"), ("chem", "sue"), ("chem", "tux")}
        assert s.query(MembershipEvent).filter_by(kind="added").count() == 4
        accounts = {(a.name, a.project.name, a.is_default, a.active) for a in s.scalars(select(Account))}
        assert accounts == {("phys", "phys", True, True), ("chem", "chem", True, True)}
        grants = {
            a for a in s.scalars(
                select(Account.name).join(ServiceGrant, ServiceGrant.account_id == Account.id)
                .where(ServiceGrant.service_id == service.id, ServiceGrant.revoked_at.is_(None))
            )
        }
        assert grants == {"phys", "chem"}


def test_a_failing_shell_script_commits_nothing(committed: Engine) -> None:
    script = 'create_system("cluster")\ncreate_user("bob")\ncreate_project("phys", pi="nobody")\n'
    result = openacct("shell", stdin=script)
    assert result.returncode == 1
    assert "line 3" in result.stderr and "no user named 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
    with Session(committed) as s:
        assert s.query(System).count() == 0 and s.query(User).count() == 0


def test_a_script_bug_shows_the_script_line_and_commits_nothing(committed: Engine, tmp_path: Path) -> None:
    script = tmp_path / "setup.py"
    script.write_text('create_system("cluster")\nundefined_name\n')
    result = openacct("shell", str(script))
    assert result.returncode == 1
    assert "NameError" in result.stderr and "line 2" in result.stderr
    with Session(committed) as s:
        assert s.query(System).count() == 0
