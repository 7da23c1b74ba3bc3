"""``openacct slurm sync``: the sacctmgr commands that make Slurm's associations match OpenAcct."""

from __future__ import annotations

import pytest

from openacct.shortcuts import add_user_to_project, create_user
from shared.db import session_scope
from shared.errors import InvalidInput
from shared.slurm.sync import parse_associations, plan, wanted

SACCTMGR_LISTING = "root|\nroot|root\nphys|\nphys|tux\nphys|alice\nlocal|\nlocal|ops\n"


@pytest.mark.usefixtures("quickstart")
def test_the_plan_adds_what_is_missing_removes_who_left_and_leaves_other_accounts_alone() -> None:
    accounts, users = parse_associations(SACCTMGR_LISTING)
    assert accounts == {"root", "phys", "local"} and ("phys", "alice") in users
    with session_scope() as s:
        commands = plan(wanted(s), accounts - {"root"}, {u for u in users if u[0] != "root"}, "cluster")
    assert [" ".join(c) for c in commands] == [
        "sacctmgr -i add account chem cluster=cluster description=Chemistry Dept organization=chem",
        "sacctmgr -i add user sue account=chem cluster=cluster",
        "sacctmgr -i add user tux account=chem cluster=cluster",
        "sacctmgr -i add user bob account=phys cluster=cluster",
        "sacctmgr -i remove user alice where account=phys cluster=cluster",
    ]  # the PIs are members; 'local' and its user are the site's own


@pytest.mark.usefixtures("quickstart")
def test_once_in_step_the_plan_is_empty() -> None:
    with session_scope() as s:
        want = wanted(s)
    assert plan(want, set(want.accounts), set(want.members), "cluster") == []


@pytest.mark.usefixtures("quickstart")
def test_a_name_sacctmgr_could_misread_is_refused() -> None:
    with session_scope() as s:
        want = wanted(s)
    want.members.add(("phys", "-i=oops"))
    with pytest.raises(InvalidInput, match="cannot be a Slurm account or user name"):
        plan(want, set(), set(), "cluster")


@pytest.mark.usefixtures("quickstart")
def test_a_member_who_joins_is_added() -> None:
    create_user("eve")
    add_user_to_project("eve", "chem")
    with session_scope() as s:
        want = wanted(s)
    assert plan(want, set(want.accounts), set(want.members) - {("chem", "eve")}, "cluster") == [
        ["sacctmgr", "-i", "add", "user", "eve", "account=chem", "cluster=cluster"]]


def test_without_sacctmgr_the_command_says_so(cli, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATH", str(tmp_path))  # whether this machine has Slurm's tools or not
    result = cli("slurm", "sync", "--cluster", "cluster", "--dry-run")
    assert result.code != 0 and "sacctmgr is not on PATH" in result.err
