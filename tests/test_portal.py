"""The web portal against a real ``openacct api serve`` process and the committed quick-start
center, in a real headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``,
nothing to install): a user signs in by pasting a token, pages render with their numbers, charts
have real heights (measured in the laid-out page and in the screenshot's pixels), a PI adds and
removes a member through the form, and what must be refused is: a POST without its CSRF token,
a member's forged POST, another's project (404, word for word a missing one's)."""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import os
import re
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy import select as query

from services.charger.batch import charge_events
from shared import db, member_limits
from shared.models import MembershipEvent, Project, ProjectMember, User
from tests.api_server import ApiServer, token
from tests.events import job_completed, raw
from tests.test_statement_page import CHROMIUM, is_bar, tallest_bar

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's)")
NOW = dt.datetime.now(dt.UTC)
# The jobs charged: (job id, user, project, CPUs, hours, days ago); core-hours cost 0.05.
JOBS = [("101", "tux", "phys", 64, 10, 3), ("102", "tux", "phys", 32, 5, 1), ("201", "bob", "phys", 128, 10, 2),
        ("301", "sue", "chem", 16, 10, 2)]
COST = {"101": "32.00", "102": "8.00", "201": "64.00", "301": "8.00"}


class Chromium:
    """Headless Chromium spoken to over the DevTools protocol on a pipe: it reads commands on
    its fd 3 and writes answers and events on its fd 4, each a JSON text ended by a NUL byte."""

    def __init__(self, profile: Path) -> None:
        into_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        # Out of the way of 3 and 4, so that the child's dup2 overwrites nothing it still needs.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (into_child, from_child)]

        def wire() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.log = open(profile.with_suffix(".log"), "wb")  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",  # type: ignore[list-item]
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
             "--no-default-browser-check", "--window-size=1000,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, preexec_fn=wire, close_fds=False, start_new_session=True)
        for fd in (into_child, from_child, *high):
            os.close(fd)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive(60)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, session: str, methods: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        """The first event of ``session`` among ``methods``, received already or to come."""
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") in methods and event.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._receive(timeout))

    def _receive(self, timeout: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], timeout)
            if not ready:
                raise AssertionError(f"Chromium said nothing for {timeout} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise AssertionError("Chromium closed its pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(20)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)
        os.close(self._in)
        os.close(self._out)
        self.log.close()


class Tab:
    """A tab in a browser context of its own (its own cookies: one signed-in user)."""

    def __init__(self, browser: Chromium) -> None:
        self.browser = browser
        context = browser.call("Target.createBrowserContext")["browserContextId"]
        target = browser.call("Target.createTarget", url="about:blank", browserContextId=context)["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Network.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride", width=1000, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, self.session, **params)

    def _forget_events(self) -> None:
        self.browser.events = [e for e in self.browser.events if e.get("sessionId") != self.session]

    def _loaded(self) -> int:
        """Waits for the page a navigation ends on; the HTTP status of its document."""
        status = None
        while True:
            event = self.browser.wait_for(self.session, ("Network.responseReceived", "Page.loadEventFired"))
            if event["method"] == "Page.loadEventFired" and status is not None:  # not an earlier page's
                return status
            if event["params"].get("type") == "Document":
                status = event["params"]["response"]["status"]

    def goto(self, url: str) -> int:
        self._forget_events()
        self.call("Page.navigate", url=url)
        return self._loaded()

    def act(self, script: str) -> int:
        """Runs ``script`` (a click that sends a form, say) and waits for the page it leads to."""
        self._forget_events()
        self.js(script)
        return self._loaded()

    def js(self, expression: str) -> Any:
        found = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in found, found["exceptionDetails"]
        return found["result"].get("value")

    @property
    def text(self) -> str:
        return str(self.js("document.body.innerText"))

    def heights(self, selector: str) -> list[float]:
        """The laid-out heights, in CSS pixels, of the elements ``selector`` finds."""
        return list(self.js(f"[...document.querySelectorAll({json.dumps(selector)})]"
                            ".map(e => e.getBoundingClientRect().height)"))

    def screenshot(self, path: Path) -> tuple[tuple[int, int], list[tuple[int, ...]]]:
        """The whole page as Chromium draws it, 1000 pixels wide, saved to ``path``: its size and
        pixels, row by row."""
        from PIL import Image

        height = min(int(self.call("Page.getLayoutMetrics")["cssContentSize"]["height"]) + 1, 4000)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1000, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))
        image = Image.open(path).convert("RGB")
        data = image.tobytes()
        return image.size, [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]


@pytest.fixture(scope="module")
def portal(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module, believing X-Remote-User from 127.0.0.1 (an SSO proxy's)."""
    with ApiServer(tmp_path_factory.mktemp("portal"), api_sso_header="X-Remote-User",
                   api_trusted_proxies='["127.0.0.1/32"]') as server:
        yield server.url


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's)")
    browser = Chromium(tmp_path_factory.mktemp("chromium") / "profile")
    yield browser
    browser.close()


@pytest.fixture
def site(center: Engine, portal: str) -> dict[str, str]:
    """The quick-start center with four jobs charged by the charger's own code, over the last
    days; the portal's URL and a manage token each for bob, sue and tux, and a read one for bob."""
    with db.session_scope() as s:
        events = [job_completed(job_id, user=user, account=project, cpus=cpus, seconds=hours * 3600,
                                end=NOW - dt.timedelta(days=days))
                  for job_id, user, project, cpus, hours, days in JOBS]
        assert charge_events(s, [raw(e).decode() for e in events]).charged == len(JOBS)
    return {"url": portal, **{user: token(user, "manage") for user in ("bob", "sue", "tux")},
            "bob-read": token("bob", "read")}


def members(project: str) -> list[str]:
    with db.session_scope() as s:
        return list(s.scalars(query(User.name).join(ProjectMember, ProjectMember.user_id == User.id)
                              .join(Project, Project.id == ProjectMember.project_id)
                              .where(Project.name == project).order_by(User.name)))


def signed_in(browser: Chromium, url: str, token: str) -> Tab:
    """A tab whose user pasted ``token`` into the login page."""
    tab = Tab(browser)
    assert tab.goto(url + "/") == 401  # no session yet: the login page
    assert tab.js("document.title").startswith("Sign in")
    assert tab.act(f"document.querySelector('#token').value = {json.dumps(token)};"
                   "document.querySelector('#login button').click()") == 200
    assert tab.js("location.pathname") == "/"
    return tab


def drawn(size: tuple[int, int], pixels: list[tuple[int, ...]], path: Path) -> None:
    """A screenshot with a page on it: text, and the charts' bars standing tall."""
    assert path.stat().st_size > 10_000
    inked = sum(1 for p in pixels if max(p) < 200)
    assert inked > 5_000, f"only {inked} dark pixels in {path}"
    bars = sum(1 for p in pixels if is_bar(p))
    assert bars > 3_000, f"the charts' bars cover {bars} pixels in {path}"
    assert tallest_bar(size, pixels) >= 100


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token a page gave a client that had none: in its cookie, and in its forms."""
    token = page.cookies["openacct_csrf"]
    assert all(found == token for found in re.findall(r'name="csrf_token" value="([^"]+)"', page.text))
    return token


# --------------------------------------------------------------------------- in Chromium


@needs_chromium
def test_pages_render_with_their_numbers_and_charts(site: dict[str, str], chromium: Chromium, tmp_path: Path) -> None:
    tab = signed_in(chromium, site["url"], site["bob"])
    cookie = next(c for c in tab.call("Network.getCookies")["cookies"] if c["name"] == "openacct_session")
    assert cookie["value"] == site["bob"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # My projects: bob's one project, its balance (1000 - 32 - 8 - 64) and burn-down.
    assert tab.js("document.title") == "My projects · OpenAcct"
    text = tab.text
    assert "phys" in text and "chem" not in text
    assert "896.00" in text and "no end" in text
    bars = tab.heights("#project-phys svg.chart rect")
    assert len(bars) > 50 and max(bars) > 140  # a bar per run of days, the full 148 px before the jobs
    assert min(bars) > 0.8 * max(bars)  # 896 of 1000 left: still tall
    drawn(*tab.screenshot(tmp_path / "projects.png"), tmp_path / "projects.png")

    # The project: members (tux with the cap bob set), usage by user over time, jobs with their
    # cost, statements.
    with db.session_scope() as s:
        member_limits.set_limit(s, s.scalars(query(Project).where(Project.name == "phys")).one(), "tux", "100",
                                "allocation", actor="bob")
    assert tab.goto(site["url"] + "/projects/phys") == 200
    assert tab.js("document.title") == "phys · OpenAcct"
    text = tab.text
    for expected in ("bob", "tux", "896.00", "PI", *(COST[j] for j in ("101", "102", "201"))):
        assert expected in text
    cap = tab.js("document.querySelector('#member-tux').innerText")
    assert "100.00 per allocation" in cap and "40.00" in cap and "60.00" in cap  # spent 32 + 8, 60 left
    stacked = tab.heights("#usage svg.chart rect")
    assert len(stacked) == 3  # three days with use, one user each
    assert max(stacked) == pytest.approx(148, abs=1)  # bob's 64.00, the tallest
    assert sorted(stacked)[:2] == [pytest.approx(148 * 8 / 64, abs=1), pytest.approx(148 * 32 / 64, abs=1)]
    assert tab.js("document.querySelectorAll('#usage .legend li').length") == 2
    links = tab.js("[...document.querySelectorAll('#statements a')].map(a => a.href)")
    assert len(links) == 9 and all("/api/v1/projects/phys/statement?period=" in link for link in links)
    for link in links[:3]:  # this month's, in each format, from the API with the same token
        assert httpx.get(link, headers={"Authorization": f"Bearer {site['bob']}"}, timeout=30).status_code == 200
    drawn(*tab.screenshot(tmp_path / "project.png"), tmp_path / "project.png")


@needs_chromium
def test_a_pi_adds_and_removes_a_member_through_the_form(site: dict[str, str], chromium: Chromium,
                                                         tmp_path: Path) -> None:
    tab = signed_in(chromium, site["url"], site["bob"])
    assert tab.goto(site["url"] + "/projects/phys") == 200
    assert "sue" not in members("phys")
    status = tab.act("document.querySelector('#new-member').value = 'sue';"
                     "document.querySelector('#add-member button').click()")
    assert status == 200, tab.text
    assert tab.js("location.pathname + location.search") == "/projects/phys?added=sue"
    assert "sue is a member now." in tab.text
    assert tab.js("document.querySelector('#member-sue') !== null")
    assert members("phys") == ["bob", "sue", "tux"]
    with db.session_scope() as s:
        event = s.scalars(query(MembershipEvent).order_by(MembershipEvent.id.desc()).limit(1)).one()
        assert (event.kind, event.actor) == ("added", "api:bob")
    tab.screenshot(tmp_path / "added.png")

    assert tab.act("document.querySelector('#member-sue form.remove button').click()") == 200
    assert "sue is no longer a member." in tab.text
    assert members("phys") == ["bob", "tux"]

    # What the domain refuses is said on the page, and nothing changes.
    assert tab.act("document.querySelector('#new-member').value = 'nobody';"
                   "document.querySelector('#add-member button').click()") == 422
    assert "no user named nobody" in tab.text
    assert tab.act("document.querySelector('#new-member').value = 'tux';"
                   "document.querySelector('#add-member button').click()") == 409
    assert "already a member" in tab.text
    assert members("phys") == ["bob", "tux"]
    assert tab.js("document.querySelector('#member-bob form.remove')") is None  # nobody removes the PI


@needs_chromium
def test_a_member_sees_their_own_and_no_form_and_a_forged_post_is_refused(
        site: dict[str, str], chromium: Chromium, tmp_path: Path) -> None:
    tab = signed_in(chromium, site["url"], site["tux"])
    assert "phys" in tab.text and "chem" in tab.text  # tux is in both
    assert tab.goto(site["url"] + "/projects/phys") == 200
    assert tab.js("document.querySelector('#add-member, form.remove')") is None
    jobs = tab.js("[...document.querySelectorAll('#jobs tbody tr td:first-child')].map(td => td.innerText)")
    assert sorted(jobs) == ["101", "102"]  # not bob's 201
    usage = tab.js("[...document.querySelectorAll('#usage tbody tr td:first-child')].map(td => td.innerText)")
    assert usage == ["tux"]
    assert len(tab.heights("#usage svg.chart rect")) == 2
    tab.screenshot(tmp_path / "member.png")

    # A form forged in tux's own page, with the CSRF token of tux's own sign-out form: the CSRF
    # check passes, the access check refuses.
    status = tab.act(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/projects/phys/members';"
        "const token = document.querySelector('header input[name=csrf_token]').value;"
        "for (const [k, v] of [['user', 'sue'], ['csrf_token', token]]) {"
        " const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }"
        "document.body.appendChild(f); f.submit();")
    assert status == 403 and "only the PI of project phys" in tab.text
    assert members("phys") == ["bob", "tux"]


@needs_chromium
def test_signing_out_forgets_the_session(site: dict[str, str], chromium: Chromium, tmp_path: Path) -> None:
    tab = signed_in(chromium, site["url"], site["sue"])
    assert "chem" in tab.text and "phys" not in tab.text
    assert tab.act("document.querySelector('header form button').click()") == 200
    assert tab.js("location.pathname") == "/login"
    size, pixels = tab.screenshot(tmp_path / "login.png")
    assert size[0] == 1000 and sum(1 for p in pixels if max(p) < 200) > 2_000  # the form is drawn
    assert not [c for c in tab.call("Network.getCookies")["cookies"] if c["name"] == "openacct_session"]
    assert tab.goto(site["url"] + "/") == 401


# --------------------------------------------------------------------------- over HTTP


def test_without_credentials_the_login_page_and_another_projects_404_is_a_missing_ones(site: dict[str, str]) -> None:
    url = site["url"]
    for headers in ({}, {"Authorization": "Bearer oa_" + "x" * 43}, {"Cookie": "openacct_session=oa_nothing"}):
        page = httpx.get(url + "/projects/phys", headers=headers, timeout=30)
        assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
        assert 'id="login"' in page.text and "896.00" not in page.text
    bob = {"Authorization": f"Bearer {site['bob']}"}
    theirs = httpx.get(url + "/projects/chem", headers=bob, timeout=30)
    missing = httpx.get(url + "/projects/nosuch", headers=bob, timeout=30)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.text.replace("chem", "NAME") == missing.text.replace("nosuch", "NAME")
    assert "1,000" not in theirs.text and "sue" not in theirs.text
    # A project page's HTML escapes what it shows, and the page loads nothing but its style sheet.
    page = httpx.get(url + "/projects/phys", headers=bob, timeout=30)
    assert "script-src" not in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<script" not in page.text


def test_a_post_without_its_csrf_token_is_refused_and_changes_nothing(site: dict[str, str]) -> None:
    url, bob = site["url"], {"Authorization": f"Bearer {site['bob']}"}
    token = csrf_of(httpx.get(url + "/projects/phys", headers=bob, timeout=30))
    add = url + "/projects/phys/members"
    for fields, cookie, extra in (
            ({"user": "sue"}, None, {}),  # no token at all
            ({"user": "sue", "csrf_token": token}, None, {}),  # the field without its cookie
            ({"user": "sue"}, token, {}),  # the cookie without the field
            ({"user": "sue", "csrf_token": "y" * 43}, token, {}),  # not the same
            ({"user": "sue", "csrf_token": token}, token, {"Sec-Fetch-Site": "cross-site"}),  # another site's form
            ({"user": "sue", "csrf_token": token}, token, {"Sec-Fetch-Site": "same-site"})):  # a sibling subdomain's
        headers = {**bob, **extra, **({"Cookie": f"openacct_csrf={cookie}"} if cookie else {})}
        refused = httpx.post(add, data=fields, headers=headers, timeout=30)
        assert refused.status_code == 403, (fields, cookie, extra)
        assert members("phys") == ["bob", "tux"]
    made = httpx.post(add, data={"user": "sue", "csrf_token": token},
                      headers={**bob, "Cookie": f"openacct_csrf={token}"}, timeout=30)
    assert made.status_code == 303 and made.headers["location"] == "/projects/phys?added=sue"
    assert members("phys") == ["bob", "sue", "tux"]


def test_a_planted_csrf_cookie_does_not_go_with_someone_elses_session(site: dict[str, str]) -> None:
    """Whoever can set a cookie for the site (a sibling subdomain, the network) can pick the
    double-submit value; with a session, the token is derived from the session, which they lack."""
    url, planted = site["url"], "a" * 40
    headers = {"Cookie": f"openacct_session={site['bob']}; openacct_csrf={planted}"}
    refused = httpx.post(url + "/projects/phys/members", data={"user": "sue", "csrf_token": planted},
                         headers=headers, timeout=30)
    assert refused.status_code == 403 and members("phys") == ["bob", "tux"]
    page = httpx.get(url + "/projects/phys", headers={"Cookie": f"openacct_session={site['bob']}"}, timeout=30)
    (bound,) = set(re.findall(r'name="csrf_token" value="([^"]+)"', page.text))  # the session's, not a cookie's
    assert bound != planted and bound != page.cookies.get("openacct_csrf")
    made = httpx.post(url + "/projects/phys/members", data={"user": "sue", "csrf_token": bound},
                      headers={"Cookie": f"openacct_session={site['bob']}"}, timeout=30)
    assert made.status_code == 303 and members("phys") == ["bob", "sue", "tux"]


def test_single_sign_on_and_a_read_token(site: dict[str, str]) -> None:
    url = site["url"]
    sue = {"X-Remote-User": "sue"}  # from 127.0.0.1, a trusted proxy here
    page = httpx.get(url + "/", headers=sue, timeout=30)
    assert page.status_code == 200 and "chem" in page.text and 'href="/projects/phys"' not in page.text
    assert httpx.post(url + "/projects/chem/members", data={"user": "bob"}, headers=sue, timeout=30).status_code == 403
    assert members("chem") == ["sue", "tux"]

    read = {"Authorization": f"Bearer {site['bob-read']}"}
    page = httpx.get(url + "/projects/phys", headers=read, timeout=30)
    assert page.status_code == 200 and 'id="add-member"' not in page.text and "896.00" in page.text
    token = csrf_of(page)  # the sign-out form's: a read token never shows a membership form
    refused = httpx.post(url + "/projects/phys/members", data={"user": "sue", "csrf_token": token},
                         headers={**read, "Cookie": f"openacct_csrf={token}"}, timeout=30)
    assert refused.status_code == 403 and members("phys") == ["bob", "tux"]


def test_a_burn_down_spans_the_allocation_period_with_bars_up_to_today() -> None:
    from decimal import Decimal

    from openacct.api.portal import BURN_DOWN_BARS, burn_down_chart

    first, today, last = dt.date(2026, 10, 1), dt.date(2026, 10, 31), dt.date(2026, 12, 29)
    chart = burn_down_chart(first, last, today, lambda day: Decimal(9000 - 100 * (day - first).days), Decimal(9000))
    assert len(chart.bars) == 31  # a bar a day, none for the days to come
    assert chart.bars[0].height == pytest.approx(chart.plot_height) and chart.bars[-1].height == pytest.approx(
        chart.plot_height * 6000 / 9000, abs=0.1)
    assert [line.kind for line in chart.lines] == ["pace", "today"]  # 9000 at the start, 0 at the end
    assert chart.lines[0].y1 == chart.top_pad and chart.lines[0].y2 == chart.base
    long = burn_down_chart(dt.date(2025, 1, 1), dt.date(2026, 12, 31), dt.date(2026, 12, 31),
                           lambda day: Decimal(1), None)
    assert len(long.bars) <= BURN_DOWN_BARS and not long.lines  # runs of days; no end to pace towards
