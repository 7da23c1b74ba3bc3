"""The JSON API against a real ``openacct api serve`` process and the real database: who may see
and do what (the access matrix), tokens and their scopes, membership through the domain code,
and hostile input answered with a 4xx that changes nothing."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text, update

from openacct import shortcuts as sc
from openacct.api import tokens
from shared import db, member_limits
from shared.errors import AlreadyExists, NotFound
from shared.models import ApiToken, MembershipEvent, Project, ProjectMember, User
from tests.api_server import ApiServer, token
from tests.pipeline import OPENACCT

PERIOD = dt.datetime.now(dt.UTC).strftime("%Y-%m")


@pytest.fixture(scope="module")
def api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module; each test commits its own center (``world``)."""
    with ApiServer(tmp_path_factory.mktemp("api"), api_admins='["admin"]', api_sso_header="X-Remote-User",
                   api_trusted_proxies='["127.0.0.2/32"]') as server:
        yield server.url


@dataclass
class World:
    url: str
    token: dict[str, str]  # caller -> the Authorization header's value ("" for none)
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def call(self, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": self.token[who]} if self.token.get(who) else {}
        return self.client.request(method, self.url + path, headers={**headers, **kwargs.pop("headers", {})},
                                   **kwargs)


@pytest.fixture
def world(center: Engine, api: str) -> Iterator[World]:
    """The quick-start center (bob leads phys, sue chem, tux in both) with ann, a member of phys
    whom bob named a manager, carl in no project, an administrator, and four charged jobs."""
    with db.session_scope():
        for name in ("ann", "carl", "admin"):
            sc.create_user(name)
        sc.add_user_to_project("ann", "phys")
        sc.add_project_manager("ann", "phys", actor="bob")
        submitted = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        for job_id, user, project in (("1001", "tux", "phys"), ("1002", "bob", "phys"),
                                      ("2001", "sue", "chem"), ("2002", "tux", "chem")):
            job = sc.record_job("cluster", job_id, submit_time=submitted, user=user, account=project,
                                start_time=submitted, end_time=submitted + dt.timedelta(hours=1), cpus=4,
                                state="COMPLETED")
            sc.charge(project, "cluster-core-hours", "16", user=user, job=job, key=f"job-{job_id}")
    expired, revoked = token("tux", "manage"), token("tux", "manage")
    with db.session_scope() as s:
        s.execute(update(ApiToken).where(ApiToken.token_hash == tokens.digest(expired))
                  .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        tokens.revoke(s, s.scalars(select(ApiToken.id).where(ApiToken.token_hash == tokens.digest(revoked))).one())
    bearer = {who: f"Bearer {token(who, 'manage')}" for who in ("tux", "bob", "ann", "sue", "admin")}
    world = World(api, {"anonymous": "", "bad token": "Bearer oa_" + "x" * 43, "expired token": f"Bearer {expired}",
                        "revoked token": f"Bearer {revoked}", **bearer})
    with world.client:
        yield world


CALLERS = ["anonymous", "bad token", "expired token", "revoked token", "tux", "bob", "ann", "admin", "sue"]
# What each caller gets from each endpoint, about phys (bob's; tux and ann members, ann a manager;
# sue leads chem only). Writes are undone as each caller makes them, so every row starts alike.
MATRIX: dict[tuple[str, str], list[int]] = {
    #                                                       tux  bob  ann adm sue
    ("GET", "/api/v1/me"):                                 [200, 200, 200, 200, 200],
    ("GET", "/api/v1/projects"):                           [200, 200, 200, 200, 200],
    ("GET", "/api/v1/projects/phys"):                      [200, 200, 200, 200, 404],
    ("GET", "/api/v1/projects/phys/usage?by=user,month"):  [200, 200, 200, 200, 404],
    ("GET", f"/api/v1/projects/phys/statement?period={PERIOD}"): [200, 200, 200, 200, 404],
    ("GET", "/api/v1/jobs"):                               [200, 200, 200, 200, 200],
    ("GET", "/api/v1/jobs?project=phys"):                  [200, 200, 200, 200, 404],
    ("GET", "/api/v1/jobs/1001"):                          [200, 200, 200, 200, 404],
    ("GET", "/api/v1/jobs/1002"):                          [404, 200, 200, 200, 404],
    ("GET", "/api/v1/jobs/2001"):                          [404, 404, 404, 200, 200],
    ("POST", "/api/v1/projects/phys/members"):             [403, 201, 201, 201, 404],
    ("DELETE", "/api/v1/projects/phys/members/carl"):      [403, 200, 200, 200, 404],
    ("POST", "/api/v1/projects/phys/managers"):            [403, 201, 403, 201, 404],
    ("DELETE", "/api/v1/projects/phys/managers/tux"):      [403, 200, 403, 200, 404],
    # Spending limits are the PI's to set: a manager could raise their own.
    ("PUT", "/api/v1/projects/phys/limits/tux"):           [403, 200, 403, 200, 404],
    ("DELETE", "/api/v1/projects/phys/limits/tux"):        [403, 200, 403, 200, 404],
    ("POST", "/api/v1/quotes"):                            [200, 200, 200, 200, 404],
}
BODIES = {("POST", "/api/v1/projects/phys/members"): {"user": "carl"},
          ("POST", "/api/v1/projects/phys/managers"): {"user": "tux"},
          ("PUT", "/api/v1/projects/phys/limits/tux"): {"cap": "100.00", "period": "month"},
          ("POST", "/api/v1/quotes"): {"account": "phys", "minutes": 60, "cpus": 4}}


def _arrange(method: str, path: str) -> None:
    """What a write row of the matrix starts from, whoever made the last call: carl not in phys
    for POST, in it for DELETE; tux not managing phys for POST, managing it for DELETE; tux
    without a spending limit in phys for PUT, with one for DELETE."""
    member, manager = "/members" in path, "/managers" in path
    wanted = method == "DELETE"
    if "/limits/" in path:
        with db.session_scope() as s:
            phys = sc.get_project("phys")
            try:
                if wanted:
                    member_limits.set_limit(s, phys, "tux", "50", actor="test")
                else:
                    member_limits.clear_limit(s, phys, "tux")
            except NotFound:
                pass
    for present, add, remove, user in ((member, sc.add_user_to_project, sc.remove_user_from_project, "carl"),
                                       (manager, sc.add_project_manager, sc.remove_project_manager, "tux")):
        if present:
            try:
                (add if wanted else remove)(user, "phys")
            except (AlreadyExists, NotFound):
                pass


def test_the_access_matrix(world: World) -> None:
    """Every caller against every endpoint: 401 for no credentials or dead ones, 404 for a project
    that is not the caller's, 403 for a member who does not manage it, the rest answered."""
    got, want = {}, {}
    for (method, path), codes in MATRIX.items():
        for who, code in zip(CALLERS, [401] * 4 + codes, strict=True):
            if method != "GET":
                _arrange(method, path)
            response = world.call(who, method, path, json=BODIES.get((method, path)))
            got[method, path, who], want[method, path, who] = response.status_code, code
            assert response.headers["content-type"].startswith(("application/json", "text/csv", "text/html"))
            if response.status_code >= 400:
                assert list(response.json()) == ["error"], (method, path, who, response.text)
            if response.status_code == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def test_what_each_caller_sees(world: World) -> None:
    def names(who: str, path: str, key: str = "name") -> list[str]:
        return [row[key] for row in world.call(who, "GET", path).json()]

    assert names("tux", "/api/v1/projects") == ["chem", "phys"]
    assert names("bob", "/api/v1/projects") == ["phys"]
    assert names("ann", "/api/v1/projects") == ["phys"]
    assert names("admin", "/api/v1/projects") == ["chem", "phys"]
    (phys,) = world.call("bob", "GET", "/api/v1/projects").json()
    assert phys == {"name": "phys", "pi": "bob", "allocated": "1000.00", "charged": "1.60", "refunded": "0.00",
                    "held": "0.00", "available": "998.40", "credit_limit": "0.00", "expires_at": None,
                    "my_limit": None}
    # Jobs: a user sees their own, the PI and a manager the project's, an administrator all.
    assert sorted(names("tux", "/api/v1/jobs", "job_id")) == ["1001", "2002"]
    assert sorted(names("tux", "/api/v1/jobs?project=phys", "job_id")) == ["1001"]
    assert sorted(names("bob", "/api/v1/jobs", "job_id")) == ["1001", "1002"]
    assert sorted(names("ann", "/api/v1/jobs", "job_id")) == ["1001", "1002"]
    assert sorted(names("admin", "/api/v1/jobs", "job_id")) == ["1001", "1002", "2001", "2002"]
    assert sorted(names("sue", "/api/v1/jobs", "job_id")) == ["2001", "2002"]
    (job,) = world.call("tux", "GET", "/api/v1/jobs/1001").json()
    assert (job["user"], job["project"], job["cost"]) == ("tux", "phys", "0.80")
    assert [(t["kind"], t["amount"], t["quantity"], t["rate"]) for t in job["transactions"]] == [
        ("charge", "-0.80", "16", "0.05")]
    assert job["transactions"][0]["details"] == {"multiplier": "1.00"}  # what sc.charge recorded
    # Usage: the PI every member's, a member their own.
    usage = world.call("bob", "GET", "/api/v1/projects/phys/usage").json()
    assert (usage["only_user"], sorted((r["user"], r["charged"]) for r in usage["rows"])) == (
        None, [("bob", "0.80"), ("tux", "0.80")])
    usage = world.call("tux", "GET", "/api/v1/projects/phys/usage?by=user,month").json()
    assert (usage["only_user"], [(r["user"], r["month"], r["net"]) for r in usage["rows"]]) == (
        "tux", [("tux", PERIOD, "0.80")])
    # A project's page: members with their roles.
    detail = world.call("tux", "GET", "/api/v1/projects/phys").json()
    assert [(m["user"], m["pi"], m["manager"]) for m in detail["members"]] == [
        ("ann", False, True), ("bob", True, False), ("tux", False, False)]
    assert (detail["managers"], detail["you_manage"], detail["balance"]["available"]) == (["ann"], False, "998.40")
    assert [a["amount"] for a in detail["allocations"]] == ["1000.00"]
    me = world.call("ann", "GET", "/api/v1/me").json()
    assert (me["user"], me["admin"], me["scope"], me["via"], me["projects"]) == ("ann", False, "manage", "token",
                                                                                 ["phys"])
    assert world.call("admin", "GET", "/api/v1/me").json()["admin"] is True


def test_statements_in_three_formats_itemized_for_those_who_see_every_member(world: World) -> None:
    path = f"/api/v1/projects/phys/statement?period={PERIOD}"
    whole = world.call("bob", "GET", path).json()
    assert (whole["project"], whole["closing"], len(whole["lines"])) == ("phys", "998.40", 2)
    totals = world.call("tux", "GET", path).json()  # other members' jobs are not tux's to see
    assert (totals["closing"], totals["lines"]) == ("998.40", [])
    csv = world.call("bob", "GET", path + "&format=csv")
    assert csv.headers["content-type"].startswith("text/csv") and "closing balance" in csv.text
    assert f'filename="phys-{PERIOD}.csv"' in csv.headers["content-disposition"]
    html = world.call("ann", "GET", path + "&format=html")
    assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()


def test_another_projects_404_is_word_for_word_a_missing_ones(world: World) -> None:
    """sue cannot tell phys (bob's) from a project that does not exist, on any endpoint."""
    for method, path in [("GET", "/api/v1/projects/{}"), ("GET", "/api/v1/projects/{}/usage"),
                         ("GET", f"/api/v1/projects/{{}}/statement?period={PERIOD}"), ("GET", "/api/v1/jobs?project={}"),
                         ("POST", "/api/v1/projects/{}/members"), ("DELETE", "/api/v1/projects/{}/members/tux"),
                         ("POST", "/api/v1/projects/{}/managers"), ("PUT", "/api/v1/projects/{}/limits/tux"),
                         ("DELETE", "/api/v1/projects/{}/limits/tux")]:
        body = {"POST": {"user": "sue"}, "PUT": {"cap": "1"}}.get(method)
        theirs, missing = (world.call("sue", method, path.format(name), json=body) for name in ("phys", "zzzz"))
        assert theirs.status_code == missing.status_code == 404
        assert theirs.content.replace(b"phys", b"zzzz") == missing.content
        assert sorted(theirs.headers.items()) == sorted(missing.headers.items())
    quote = {"minutes": 60, "cpus": 1}
    theirs, missing = (world.call("sue", "POST", "/api/v1/quotes", json={**quote, "account": name})
                       for name in ("phys", "zzzz"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.content.replace(b"phys", b"zzzz") == missing.content
    theirs, missing = (world.call("sue", "GET", f"/api/v1/jobs/{job}") for job in ("1002", "9999"))
    assert theirs.status_code == missing.status_code == 404
    assert theirs.content.replace(b"1002", b"9999") == missing.content


def test_a_read_token_reads_and_changes_nothing(world: World) -> None:
    world.token["bob"] = f"Bearer {token('bob', 'read')}"
    assert world.call("bob", "GET", "/api/v1/projects/phys").json()["you_manage"] is True
    refused = world.call("bob", "POST", "/api/v1/projects/phys/members", json={"user": "carl"})
    assert refused.status_code == 403 and "read" in refused.json()["error"]
    assert world.call("bob", "POST", "/api/v1/quotes", json={"account": "phys", "minutes": 60}).status_code == 200
    assert _members("phys") == ["ann", "bob", "tux"]


def _members(project: str) -> list[str]:
    with db.session_scope() as s:
        return list(s.scalars(select(User.name).join(ProjectMember, ProjectMember.user_id == User.id)
                              .join(Project, Project.id == ProjectMember.project_id)
                              .where(Project.name == project).order_by(User.name)))


def test_the_pi_and_managers_manage_membership_through_the_domain_code(world: World) -> None:
    members = "/api/v1/projects/phys/members"
    added = world.call("bob", "POST", members, json={"user": "carl"})
    assert (added.status_code, added.json()) == (201, {"project": "phys", "user": "carl", "member": True})
    assert world.call("bob", "POST", members, json={"user": "carl"}).status_code == 200  # already
    assert _members("phys") == ["ann", "bob", "carl", "tux"]
    assert world.call("tux", "POST", members, json={"user": "sue"}).status_code == 403
    # DELETE with the user in the body, as with POST; the PI cannot be removed.
    assert world.call("ann", "DELETE", members, json={"user": "carl"}).json()["member"] is False
    assert world.call("ann", "DELETE", f"{members}/bob").status_code == 422
    assert world.call("bob", "POST", members, json={"user": "nobody"}).json() == {"error": "user: no user named nobody"}
    with db.session_scope() as s:
        events = s.execute(select(MembershipEvent.kind, MembershipEvent.actor).order_by(MembershipEvent.id)).all()
    assert events[-2:] == [("added", "api:bob"), ("removed", "api:ann")]
    # Managers are the PI's to name; one who leaves the project stops managing it.
    assert world.call("bob", "POST", "/api/v1/projects/phys/managers", json={"user": "tux"}).status_code == 201
    assert world.call("tux", "POST", members, json={"user": "carl"}).status_code == 201
    # a manager manages members, not the other managers: removing one is the PI's
    assert world.call("ann", "DELETE", f"{members}/tux").status_code == 403 and "tux" in _members("phys")
    assert world.call("bob", "DELETE", f"{members}/tux").status_code == 200
    assert world.call("bob", "POST", members, json={"user": "tux"}).status_code == 201
    assert world.call("tux", "POST", members, json={"user": "sue"}).status_code == 403
    assert world.call("bob", "GET", "/api/v1/projects/phys").json()["managers"] == ["ann"]


def _caps(who: str, world: World) -> tuple[list[tuple[str, str]], dict[str, str | None]]:
    """The limits ``who`` sees in phys's detail, and their own cap in each of their projects."""
    detail = world.call(who, "GET", "/api/v1/projects/phys").json()
    mine = {p["name"]: p["my_limit"] and p["my_limit"]["cap"] for p in world.call(who, "GET", "/api/v1/projects").json()}
    return [(u["user"], u["cap"]) for u in detail["limits"]], mine


def test_the_pi_caps_members_and_a_plain_member_sees_only_their_own_cap(world: World) -> None:
    limits = "/api/v1/projects/phys/limits"
    capped = world.call("bob", "PUT", f"{limits}/tux", json={"cap": "100.00", "period": "month"})
    assert capped.status_code == 200, capped.text
    use = capped.json()
    # tux's job 1001 charged 0.80 this month.
    assert {k: use[k] for k in ("project", "user", "period", "cap", "charged", "held", "spent", "left", "set_by")} == {
        "project": "phys", "user": "tux", "period": "month", "cap": "100.00", "charged": "0.80", "held": "0.00",
        "spent": "0.80", "left": "99.20", "set_by": "api:bob"}
    assert dt.datetime.fromisoformat(use["since"]).day == 1 and use["until"] is not None
    assert world.call("admin", "PUT", f"{limits}/ann", json={"cap": "5", "period": "allocation"}).json()["cap"] == "5.00"

    # The PI, a manager and an administrator see every capped member; a member their own only.
    assert _caps("tux", world) == ([("tux", "100.00")], {"chem": None, "phys": "100.00"})
    assert _caps("bob", world) == ([("ann", "5.00"), ("tux", "100.00")], {"phys": None})
    assert _caps("ann", world) == ([("ann", "5.00"), ("tux", "100.00")], {"phys": "5.00"})
    assert _caps("admin", world)[0] == [("ann", "5.00"), ("tux", "100.00")]
    (phys,) = [p for p in world.call("ann", "GET", "/api/v1/projects").json() if p["name"] == "phys"]
    assert (phys["my_limit"]["period"], phys["my_limit"]["until"]) == ("allocation", None)

    # A manager may not raise their own cap, nor a read token set one.
    refused = world.call("ann", "PUT", f"{limits}/ann", json={"cap": "5000"})
    assert (refused.status_code, refused.json()) == (403, {
        "error": "only the PI of project phys or an administrator sets its members' spending limits"})
    world.token["bob"] = f"Bearer {token('bob', 'read')}"
    assert world.call("bob", "DELETE", f"{limits}/tux").status_code == 403
    world.token["bob"] = f"Bearer {token('bob', 'manage')}"
    # No such user and a user who is not a member: one 404, word for word but the name.
    outsider, nobody = (world.call("bob", "PUT", f"{limits}/{who}", json={"cap": "1"}) for who in ("sue", "nobody"))
    assert outsider.status_code == nobody.status_code == 404
    assert outsider.json() == {"error": "user 'sue' is not a member of project 'phys'"}
    assert outsider.content.replace(b"sue", b"nobody") == nobody.content
    for body, message in [({"cap": 100}, "cap: Input should be a valid string"),
                          ({"cap": "-1"}, "cap: limit must not be negative"),
                          ({"cap": "lots"}, "cap: limit 'lots' is not a number"),
                          ({"cap": "1", "period": "week"}, "period: Input should be 'month' or 'allocation'"),
                          ({"cap": "1", "user": "bob"}, "user is not a field of this request"),
                          ({}, "cap is required")]:
        response = world.call("bob", "PUT", f"{limits}/tux", json=body)
        assert (response.status_code, list(response.json())) == (422, ["error"]), body
        assert response.json()["error"].startswith(message), (body, response.json())
    assert world.call("bob", "PUT", f"{limits}/tux;x", json={"cap": "1"}).json() == {
        "error": "user: not a valid user name"}
    assert _caps("bob", world)[0] == [("ann", "5.00"), ("tux", "100.00")]  # nothing changed

    cleared = world.call("bob", "DELETE", f"{limits}/tux")
    assert (cleared.status_code, cleared.json()) == (200, {"project": "phys", "user": "tux", "limited": False})
    again = world.call("bob", "DELETE", f"{limits}/tux")
    assert (again.status_code, again.json()) == (404, {"error": "user 'tux' has no spending limit in project 'phys'"})
    assert _caps("tux", world) == ([], {"chem": None, "phys": None})


def test_hostile_input_gets_a_clear_4xx_and_changes_nothing(world: World) -> None:
    with db.session_scope() as s:
        before = s.scalar(select(func.count()).select_from(MembershipEvent))
    members = "/api/v1/projects/phys/members"
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", members, {"json": {"user": 5}}, 422, "user: Input should be a valid string"),
        ("GET", "/api/v1/projects/phys/usage?to=0001-01-02", {}, 422, "from, to: days from 1970-01-01"),
        ("GET", "/api/v1/projects/phys/usage?from=9999-12-01&to=9999-12-31&by=month", {}, 422, "from, to: days"),
        ("POST", members, {"json": {"user": "../etc"}}, 422, "user: not a valid name"),
        ("POST", members, {"json": {"user": "x" * 100}}, 422, "user: String should have at most 64 characters"),
        ("POST", members, {"json": {}}, 422, "user is required"),
        ("POST", members, {"json": ["carl"]}, 422, "Input should be"),
        ("POST", members, {"json": {"user": "carl", "admin": True}}, 422, "admin is not a field of this request"),
        ("POST", members, {"content": b"{\"user\": ", "headers": {"content-type": "application/json"}}, 422,
         "the body is not valid JSON"),
        ("POST", members, {"json": {"user": "carl", "pad": "x" * 70_000}}, 413, "over 64 KiB"),
        ("POST", members, {"content": (b"x" * 8192 for _ in range(10))}, 413, "over 64 KiB"),  # chunked, no length
        ("POST", "/api/v1/quotes", {"json": {"account": "phys", "minutes": "60"}}, 422,
         "minutes: Input should be a valid integer"),
        ("POST", "/api/v1/quotes", {"json": {"account": "phys", "minutes": True}}, 422, "minutes: Input should be"),
        ("POST", "/api/v1/quotes", {"json": {"account": "phys", "minutes": -5}}, 422, "minutes: Input should be"),
        ("POST", "/api/v1/quotes", {"json": {"account": "phys", "minutes": 60, "cpus": 10**30}}, 422, "cpus"),
        ("POST", "/api/v1/quotes", {"json": {"account": "phys", "minutes": 60, "partition": "no such"}}, 422,
         "partition"),
        ("GET", "/api/v1/jobs?limit=abc", {}, 422, "limit: Input should be a valid integer"),
        ("GET", "/api/v1/jobs?limit=100000", {}, 422, "limit"),
        ("GET", "/api/v1/jobs/1001;drop", {}, 422, "job_id: not a valid job id"),
        ("GET", "/api/v1/projects/phys/usage?from=yesterday", {}, 422, "from: Input should be a valid date"),
        ("GET", "/api/v1/projects/phys/usage?by=evil", {}, 422, "by: one or more of"),
        ("GET", "/api/v1/projects/phys/usage?from=2026-02-01&to=2026-01-01", {}, 422, "from: the period"),
        ("GET", "/api/v1/projects/phys/statement?period=2026-13", {}, 422, "period:"),
        ("GET", "/api/v1/projects/phys/statement?period=../../etc", {}, 422, "period:"),
        ("GET", "/api/v1/projects/phys/statement?period=2026-01&format=exe", {}, 422, "format:"),
        ("PUT", members, {"json": {"user": "carl"}}, 405, "PUT is not allowed here"),
    ]
    for method, path, kwargs, status, message in cases:
        response = world.call("bob", method, path, **kwargs)
        assert (response.status_code, list(response.json())) == (status, ["error"]), (path, response.text)
        assert message in response.json()["error"], (path, response.json())
    # Path tricks: never another's project, never a 500.
    for path in ("/api/v1/projects/%2e%2e", "/api/v1/projects/..%2Fchem", "/api/v1/projects/phys%00",
                 "/api/v1/projects/phys/../chem", "/api/v1/projects/phys/..%2F..%2Fchem", "/api/v1/projects/" + "p" * 5000,
                 "/api/v1/projects/ph%20ys", "/api/v1/projects/%63hem%2Fusage", "/api/v1/jobs/..%2F1001"):
        response = world.call("bob", "GET", path)
        assert response.status_code in (404, 422) and response.json()["error"], (path, response.text)
    for header in ("Bearer " + "x" * 10_000, "Basic Ym9iOmJvYg==", "Bearer", "MUNGE", "bearer oa_\u00e9"):
        response = httpx.get(world.url + "/api/v1/me", headers={"Authorization": header.encode()})
        assert response.status_code == 401, header
    with db.session_scope() as s:
        assert s.scalar(select(func.count()).select_from(MembershipEvent)) == before
    assert _members("phys") == ["ann", "bob", "tux"]


def test_single_sign_on_is_believed_from_the_trusted_proxy_only(world: World) -> None:
    """The server trusts 127.0.0.2 as its proxy: the same header from 127.0.0.1 proves nobody."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as proxy:
        me = proxy.get(world.url + "/api/v1/me", headers={"X-Remote-User": "bob"}).json()
        assert (me["user"], me["via"], me["scope"]) == ("bob", "sso", "manage")
        assert proxy.get(world.url + "/api/v1/me", headers={"X-Remote-User": "mallory"}).status_code == 401
        assert proxy.get(world.url + "/api/v1/me", headers={"X-Remote-User": "../bob"}).status_code == 401
    assert httpx.get(world.url + "/api/v1/me", headers={"X-Remote-User": "bob"}).status_code == 401
    forwarded = {"X-Remote-User": "bob", "X-Forwarded-For": "127.0.0.2", "X-Real-IP": "127.0.0.2"}
    assert httpx.get(world.url + "/api/v1/me", headers=forwarded).status_code == 401


def test_a_token_expires_in_90_days_unless_told_otherwise(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from openacct.cli import run

    made = {}
    for label, expires in [("default", []), ("week", ["--expires", "7"]), ("forever", ["--expires", "never"])]:
        assert run(["token", "create", "sue", "--label", label, *expires]) == 0
        made[label] = capsys.readouterr().out
    assert "until revoked" in made["forever"] and "until revoked" not in made["default"]
    for bad in ("0", "3661", "-1", "90d", "", "Never", "²"):
        assert run(["token", "create", "sue", "--expires", bad]) != 0
        assert "--expires is a number of days from 1 to 3660" in capsys.readouterr().err
    now = dt.datetime.now(dt.UTC)
    with db.session_scope() as s:
        rows = {t.label: t.expires_at for t in s.scalars(select(ApiToken).where(ApiToken.label.in_(made)))}
        assert s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.label == "")) == 0
    assert rows["forever"] is None
    assert abs(rows["default"] - (now + dt.timedelta(days=90))) < dt.timedelta(minutes=5)
    assert abs(rows["week"] - (now + dt.timedelta(days=7))) < dt.timedelta(minutes=5)


def test_token_commands_show_a_token_once_and_store_its_hash_only(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from openacct.cli import run

    def openacct(*args: str) -> str:
        assert run(list(args)) == 0
        return capsys.readouterr().out

    # The real command once: the token is its last line.
    created = subprocess.run([OPENACCT, "token", "create", "tux", "--scope", "read", "--expires", "30",
                              "--label", "laptop"], capture_output=True, text=True, check=True, timeout=60).stdout
    token = created.splitlines()[-1]
    assert token.startswith("oa_") and len(token) == 46 and "shown this once" in created
    me = httpx.get(world.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert (me["user"], me["scope"]) == ("tux", "read")
    listed = openacct("token", "list", "--user", "tux", "--json")
    assert token not in listed and token[3:20] not in listed and "laptop" in listed
    with db.session_scope() as s:
        row = s.scalars(select(ApiToken).where(ApiToken.label == "laptop")).one()
        stored = " ".join(str(v) for v in s.execute(text("SELECT * FROM api_tokens")).all())
        assert row.last_used_at is not None and row.expires_at is not None
    assert token not in stored and tokens.digest(token) in stored
    openacct("token", "revoke", str(row.id))
    response = httpx.get(world.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert (response.status_code, response.json()) == (401, {"error": "the token was revoked"})
    # The PI names managers from the CLI too.
    openacct("project", "manager", "add", "phys", "tux")
    assert "tux" in openacct("project", "manager", "list", "phys")
    assert world.call("tux", "POST", "/api/v1/projects/phys/members", json={"user": "carl"}).status_code == 201
    openacct("project", "manager", "remove", "phys", "tux")
    assert world.call("tux", "POST", "/api/v1/projects/phys/members", json={"user": "sue"}).status_code == 403


def test_quotes_price_a_job_on_the_callers_account(world: World) -> None:
    quote = world.call("tux", "POST", "/api/v1/quotes", json={"account": "phys", "minutes": 120, "cpus": 8}).json()
    assert (quote["total"], quote["available"], quote["affordable"], quote["system"]) == ("0.80", "998.40", True,
                                                                                          "cluster")
    assert Decimal(quote["lines"][0]["quantity"]) == 16
    assert world.call("carl", "GET", "/api/v1/me").status_code == 401  # carl has no token


def test_openapi_describes_every_endpoint(world: World) -> None:
    paths = httpx.get(world.url + "/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/me", "/api/v1/projects", "/api/v1/projects/{name}", "/api/v1/projects/{name}/usage",
            "/api/v1/projects/{name}/statement", "/api/v1/jobs", "/api/v1/jobs/{job_id}",
            "/api/v1/projects/{name}/members", "/api/v1/projects/{name}/members/{user}",
            "/api/v1/projects/{name}/managers", "/api/v1/projects/{name}/limits/{user}", "/api/v1/quotes"} <= set(paths)
    assert httpx.get(world.url + "/api/docs").status_code == 200
