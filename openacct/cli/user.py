"""The user commands of a login node: ``openacct balance`` (no name), ``job cost ID``, ``estimate
SCRIPT``. They ask the API (``api_url``) and need no database credentials: the caller is proved by
MUNGE where ``munge`` is installed, as on any Slurm login node, else by a bearer token.

Credentials, first found wins: ``OPENACCT_API_TOKEN``; a MUNGE credential (a new one for every
request, naming it: ``munge.for_request``); the token file ``~/.config/openacct/token`` (``$XDG_CONFIG_HOME``), which must
be the caller's own and readable by nobody else (mode 0600). HTTP is the standard library's, with a
timeout, no redirects followed (credentials go to ``api_url`` and nowhere else), and every failure
one line naming what to do.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import socket
import ssl
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer

from openacct.cli.output import JsonFlag, done, emit_json, emit_rows, printable
from shared.config import get_settings
from shared.errors import ConfigError, InvalidInput, NotFound, OpenAcctError
from shared.money import display

TIMEOUT = 30.0  # seconds for the API's answer
MAX_RESPONSE = 32 << 20
TOKEN_VARIABLE = "OPENACCT_API_TOKEN"
TOKEN = re.compile(r"[\x21-\x7e]{8,512}")


class ApiError(OpenAcctError):
    """The API could not be reached, or refused: one line, with the server's reason."""


# --------------------------------------------------------------------------------------------
# Credentials and requests


def token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base:
        try:
            base = str(Path.home() / ".config")
        except (RuntimeError, KeyError):  # no HOME and no home in the password database
            base = "/nonexistent"
    return Path(base) / "openacct" / "token"


def _read_token_file(path: Path) -> str:
    """The token in ``path``: refused unless the caller owns it and nobody else can read it."""
    try:
        with path.open("rb") as handle:  # one open: the checks are of the file read, not a swapped one
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"token file {path} is not a regular file")
            if info.st_uid != os.getuid():
                raise ConfigError(f"token file {path} belongs to uid {info.st_uid}, not you: refusing it")
            if info.st_mode & 0o077:
                raise ConfigError(f"token file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                                  f"chmod 600 {path}, and revoke the token if others may have read it")
            text = handle.read(4096).decode("ascii", errors="replace").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    return _checked_token(text.splitlines()[0] if text else "", f"token file {path}")


def _checked_token(token: str, source: str) -> str:
    if not TOKEN.fullmatch(token):
        raise ConfigError(f"{source} holds no token (one line of printable characters, from openacct token create)")
    return token


@dataclass
class Credentials:
    """How this command proves its user: ``authorization()`` is the header of a request."""

    source: str  # for messages: where the token came from, or MUNGE
    token: str | None = None

    def authorization(self, method: str, path: str, query: str, body: bytes) -> str:
        """The header for the request ``method`` ``path`` (percent-decoded, from /api/v1/ on)
        ``?query`` (as sent) with ``body``."""
        if self.token is not None:
            return f"Bearer {self.token}"
        from openacct.api import munge

        try:  # a credential proves one request: a new one each time, naming it
            return f"MUNGE {munge.credential(munge.for_request(method, path, query, body))}"
        except munge.MungeRefused as exc:
            raise ApiError(f"{exc}; or use a token ({TOKEN_VARIABLE}, or the file {token_file()})") from None


def credentials() -> Credentials:
    """The first of: OPENACCT_API_TOKEN, MUNGE (where munge is installed and munged answers), the
    token file."""
    given = os.environ.get(TOKEN_VARIABLE)
    if given is not None:
        return Credentials(TOKEN_VARIABLE, _checked_token(given.strip(), TOKEN_VARIABLE))
    path = token_file()
    from openacct.api import munge

    try:
        # munge is installed and munged answers, as on a login node. The probe's credential names
        # no request, proves nothing to the API, and is never sent.
        munge.credential(munge.MARK)
        return Credentials("MUNGE")
    except munge.MungeUnavailable as exc:
        if path.exists():
            return Credentials(f"token file {path}", _read_token_file(path))
        raise ConfigError(
            (f"MUNGE cannot prove who you are ({exc})" if munge.installed() else "no credentials for the API")
            + f": set {TOKEN_VARIABLE}, or put a token (openacct token create, by your center) in {path}, mode 0600"
        ) from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx comes back as an error, and no credential goes elsewhere


_opener = urllib.request.build_opener(_NoRedirects)


def api_url() -> str:
    url = get_settings().api_url
    if not url:
        raise ConfigError("no API to ask: set OPENACCT_API_URL (or api_url in openacct.toml) to the address of "
                          "openacct api serve")
    return url


def _server_says(body: bytes) -> str:
    """The server's reason, from {"error": ...} (or FastAPI's {"detail": ...}), as one printable line."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", errors="replace").strip()
        return printable(text.splitlines()[0][:300]) if text else ""
    reason = data.get("error", data.get("detail")) if isinstance(data, dict) else data
    if isinstance(reason, list):  # FastAPI's validation errors
        reason = "; ".join(str(r.get("msg", r)) if isinstance(r, dict) else str(r) for r in reason)
    return printable(" ".join(str(reason).split())[:300]) if reason is not None else ""


class Api:
    """A session with the API: its URL, how the caller is proved, and JSON requests."""

    def __init__(self, url: str | None = None, creds: Credentials | None = None) -> None:
        self.url = url or api_url()
        self.creds = creds or credentials()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self.request("POST", path, body=body)

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Mapping[str, Any] | None = None) -> Any:
        pairs = {k: v for k, v in (query or {}).items() if v is not None}
        query_string = urllib.parse.urlencode(pairs)
        url = f"{self.url}/api/v1/{path}" + (f"?{query_string}" if query_string else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        request.add_unredirected_header("Authorization", self.creds.authorization(
            method, urllib.parse.unquote(f"/api/v1/{path}"), query_string, data or b""))
        try:
            with _opener.open(request, timeout=TIMEOUT) as response:
                payload = response.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            raise self._refused(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(self._unreachable(exc)) from None
        if len(payload) > MAX_RESPONSE:
            raise ApiError(f"the API at {self.url} answered with more than {MAX_RESPONSE >> 20} MiB")
        try:
            return json.loads(payload)
        except ValueError:
            raise ApiError(f"the API at {self.url} answered with no JSON: is api_url the address of "
                           "openacct api serve?") from None

    def _refused(self, exc: urllib.error.HTTPError) -> OpenAcctError:
        try:
            reason = _server_says(exc.read(65536))
        except OSError:
            reason = ""
        code = exc.code
        if 300 <= code < 400:
            return ApiError(f"the API at {self.url} redirects to {exc.headers.get('Location', '?')}: "
                            "set api_url to the address it points to")
        if code == 401:
            return ApiError(f"the API refused your credentials ({self.creds.source}): {reason or 'unauthorized'}")
        if code == 403:
            return ApiError(f"not allowed: {reason or 'forbidden'}")
        if code == 404:
            return NotFound(reason or f"not found at {self.url}: is api_url the address of openacct api serve?")
        if code < 500:
            return InvalidInput(reason or f"the API refused the request (HTTP {code})")
        return ApiError(f"the API at {self.url} failed (HTTP {code})" + (f": {reason}" if reason else ""))

    def _unreachable(self, exc: BaseException) -> str:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        where = f"cannot reach the API at {self.url}"
        if isinstance(reason, ConnectionRefusedError):
            return f"{where}: connection refused (is openacct api serve running there?)"
        if isinstance(reason, TimeoutError | socket.timeout):
            return f"the API at {self.url} did not answer within {TIMEOUT:g} s"
        if isinstance(reason, socket.gaierror):
            return f"{where}: unknown host"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"{where}: its certificate is not trusted ({reason.verify_message})"
        text = getattr(reason, "strerror", None) or str(reason)
        return f"{where}: {printable(text)}"


# --------------------------------------------------------------------------------------------
# openacct balance (no name), and balance NAME on a login node


def _money(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _when(value: Any) -> str:
    """An instant from the API as the center writes it: the day, and the time unless midnight,
    with how long from now; None is never."""
    if value is None:
        return "never"
    try:
        at = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return printable(str(value))
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    local = at.astimezone(get_settings().zone)
    shown = local.strftime("%Y-%m-%d") if local.time() == dt.time(0) else local.strftime("%Y-%m-%d %H:%M")
    days = (at - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    if days < 0:
        return f"{shown} (ended)"
    return f"{shown} (in {_counted(int(days), 'day')})" if days >= 1 else f"{shown} (today)"


def _listed(data: Any, key: str) -> list[dict[str, Any]]:
    """A list the API answers bare, or under ``key``."""
    if isinstance(data, dict) and isinstance(data.get(key), list):
        data = data[key]
    if not isinstance(data, list):
        raise ApiError(f"the API's answer is not a list of {key}")
    return [item for item in data if isinstance(item, dict)]


def _my_limit(project: Mapping[str, Any], me: str | None) -> Mapping[str, Any] | None:
    """The caller's cap in this project (per-member limits): GET /projects gives it as
    ``my_limit`` (null: none); GET /projects/NAME lists ``limits``, every capped member's to a PI
    or manager, so the caller's is the one with their name."""
    found = project.get("my_limit")
    if isinstance(found, Mapping) and "cap" in found:
        return found
    for found in project.get("limits") or []:
        if isinstance(found, Mapping) and "cap" in found and found.get("user") == me:
            return found
    return None


def _balance_row(project: Mapping[str, Any], me: str | None) -> dict[str, Any]:
    balance = project.get("balance") if isinstance(project.get("balance"), Mapping) else project
    assert isinstance(balance, Mapping)
    row: dict[str, Any] = {"project": project.get("name"), "pi": project.get("pi")}
    for name in ("allocated", "charged", "refunded", "held", "available"):
        row[name] = _money(balance.get(name))
    ends = project.get("expires_at", balance.get("expires_at", ""))
    row["ends"] = _when(ends) if ends != "" else ""
    limit = _my_limit(project, me)
    if limit is not None:
        row["your_cap"] = _money(limit.get("cap"))
        row["you_spent"] = _money(limit.get("spent"))
        row["you_have_left"] = _money(limit.get("left"))
        row["per"] = limit.get("period")
    return row


def asks_the_api(target: str | None) -> bool:
    """Whether ``openacct balance [TARGET]`` asks the API: with no name wherever api_url is set;
    with one, on a login node (api_url and no database_url), where no database is to be had."""
    settings = get_settings()
    return bool(settings.api_url) and (target is None or not settings.database_url)


def my_balance(project: str | None = None, *, at: str | None = None, as_json: bool = False) -> None:
    """The caller's projects (or one of them), what each has left and when its allocation ends."""
    if at is not None:
        raise InvalidInput("--at needs the database (OPENACCT_DATABASE_URL): the API gives balances as they are now")
    api = Api()
    if project is None:
        found = _listed(api.get("projects"), "projects")
    else:
        one = api.get(f"projects/{urllib.parse.quote(project, safe='')}")
        found = [one] if isinstance(one, dict) else []
    if as_json:
        emit_json(found)
        return
    if not found:
        done("you are a member of no project")
        return
    me = None
    if any(p.get("limits") for p in found):  # the members' caps: which is the caller's
        who = api.get("me")
        me = who.get("user") if isinstance(who, dict) else None
    rows = [_balance_row(p, me) for p in found]
    columns = ["project", "pi", "allocated", "charged", "refunded", "held", "available", "ends"]
    if any("your_cap" in row for row in rows):
        columns += ["your_cap", "you_spent", "you_have_left", "per"]
    emit_rows(rows, columns, as_json=False)


# --------------------------------------------------------------------------------------------
# openacct job cost ID


def _counted(n: int, thing: str) -> str:
    return f"{n:,} {thing}" + ("" if n == 1 else "s")


def _elapsed(seconds: Any) -> str:
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 0:
        return ""
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _multiplier(txn: Mapping[str, Any], details: Mapping[str, Any]) -> Decimal | None:
    """The multiplier the charge was priced with, as the ledger recorded it in its details (the
    partition's times the QoS's); else what the charge says it was: amount / (quantity x rate),
    to four places (the amount was rounded)."""
    recorded = _money(details.get("multiplier"))
    if recorded is not None:
        return recorded
    partition, qos = _money(details.get("partition_multiplier")), _money(details.get("qos_multiplier"))
    if partition is not None or qos is not None:
        return (partition or Decimal(1)) * (qos or Decimal(1))
    amount, quantity, rate = (_money(txn.get(k)) for k in ("amount", "quantity", "rate"))
    if txn.get("kind") != "charge" or not amount or not quantity or not rate:
        return None
    return (abs(amount) / (quantity * rate)).quantize(Decimal("0.0001")).normalize()


def _explain(job: Mapping[str, Any]) -> None:
    who = f"{job.get('user') or '?'} on {job.get('account') or '?'}"
    where = ", ".join(f"{k} {job[k]}" for k in ("partition", "qos") if job.get(k))
    done(f"job {job.get('job_id')} on {job.get('system')}: {who}" + (f" ({where})" if where else "")
         + f", {job.get('state') or '?'}")
    size = ", ".join(_counted(job[k], label) for k, label in (("cpus", "CPU"), ("gpus", "GPU"), ("node_count", "node"))
                     if isinstance(job.get(k), int) and job[k] > 0)
    ran = ""
    if job.get("start_time") and job.get("end_time"):
        try:
            seconds = (dt.datetime.fromisoformat(job["end_time"]) - dt.datetime.fromisoformat(job["start_time"]))
            ran = f"ran {_elapsed(int(seconds.total_seconds()))}"
        except (TypeError, ValueError):
            ran = ""
    if size or ran:
        done(", ".join(p for p in (size, ran) if p))
    if job.get("charge_policy"):
        done(f"policy: {job['charge_policy']}")
    rows, held = [], Decimal(0)
    for txn in job.get("transactions") or []:
        details = txn.get("details") if isinstance(txn.get("details"), Mapping) else {}
        amount = _money(txn.get("amount"))
        if txn.get("kind") in ("hold", "release"):  # money set aside while it runs: not a cost
            held -= amount or 0
            continue
        rows.append({
            "kind": txn.get("kind"), "service": txn.get("service") or details.get("service"),
            "count": details.get("count"), "elapsed": _elapsed(details.get("elapsed_seconds")),
            "quantity": _money(txn.get("quantity")), "rate": _money(txn.get("rate")),
            "multiplier": _multiplier(txn, details), "amount": amount,
        })
    if rows:
        columns = ["kind", "service", "count", "elapsed", "quantity", "rate", "multiplier", "amount"]
        emit_rows(rows, [c for c in columns if c not in ("count", "elapsed") or any(r[c] for r in rows)],
                  as_json=False, title="quantity = count x elapsed hours; amount = quantity x rate x multiplier")
    if held > 0:
        done(f"held while it runs: {display(held)}")
    # Amounts are signed as on a bank statement: a charge is negative, a refund positive.
    cost = _money(job.get("cost"))
    if cost is None:
        cost = -sum((r["amount"] for r in rows if r["amount"] is not None), Decimal(0))
    if not rows and not job.get("end_time"):
        done("cost: nothing yet: a job is charged when it ends")
        return
    refunded = any(r["kind"] != "charge" for r in rows)
    done(f"cost: {display(cost)}" + (" (charges less refunds and adjustments)" if refunded else ""))


def job_cost(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The scheduler's job id, as sacct shows it.")],
    system: Annotated[str | None, typer.Option(help="The system (cluster) it ran on, where ids repeat.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Explain one of your jobs' cost: quantity, rate, multipliers, the policy of its end state, amount."""
    from shared.events import NAME

    job_id = job_id.strip()
    if not NAME.fullmatch(job_id):
        raise InvalidInput(f"bad job id {job_id!r}: the scheduler's id, such as 12345")
    if system is not None and not NAME.fullmatch(system):
        raise InvalidInput(f"bad --system {system!r}: not a system's name")
    found = Api().get(f"jobs/{urllib.parse.quote(job_id, safe='')}", system=system)
    jobs = found if isinstance(found, list) else found.get("jobs", [found]) if isinstance(found, dict) else []
    if as_json:
        emit_json(found)
        return
    for n, job in enumerate(j for j in jobs if isinstance(j, dict)):
        if n:
            done("")
        _explain(job)


# --------------------------------------------------------------------------------------------
# openacct estimate SCRIPT


class ScriptError(InvalidInput):
    pass


# sbatch's short options that take no argument; every other one takes one (-t 10, -t10).
SHORT_FLAGS = frozenset("hHIkOQsvVW")
# Long options that take no argument, or one only after "=": never the next word.
LONG_FLAGS = frozenset({
    "exclusive", "hold", "requeue", "no-requeue", "parsable", "wait", "test-only", "overcommit", "spread-job",
    "contiguous", "use-min-nodes", "no-kill", "quiet", "verbose", "oversubscribe", "ignore-pbs", "get-user-env",
    "reboot", "help", "usage", "version", "nice", "propagate", "kill-on-invalid-dep", "exact", "whole",
    "wrap-up", "x11", "test",
})
# The options that price a job, by long name, with their short letter.
PRICED = {
    "time": "t", "ntasks": "n", "ntasks-per-node": None, "cpus-per-task": "c", "cpus-per-gpu": None,
    "nodes": "N", "gres": None, "gpus": "G", "gpus-per-node": None, "gpus-per-task": None,
    "partition": "p", "qos": "q", "account": "A", "clusters": "M", "array": "a",
}
SHORT = {letter: name for name, letter in PRICED.items() if letter}
ENVIRONMENT = {"account": "SBATCH_ACCOUNT", "partition": "SBATCH_PARTITION", "qos": "SBATCH_QOS",
               "time": "SBATCH_TIMELIMIT", "clusters": "SBATCH_CLUSTERS"}
LIMIT = 10_000_000


@dataclass
class Directives:
    """The ``#SBATCH`` options of a script that price it: option → (value, line number)."""

    source: str
    options: dict[str, tuple[str, int]] = field(default_factory=dict)
    ignored: list[int] = field(default_factory=list)  # lines of #SBATCH after the first command


def read_directives(text: str, source: str) -> Directives:
    """The ``#SBATCH`` lines, read as sbatch reads them: from the top, through comments and blank
    lines, up to the first command; a later option overrides an earlier one."""
    found = Directives(source)
    commands_began = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not commands_began and stripped and not stripped.startswith("#"):
            commands_began = True
        if not line.startswith("#SBATCH"):
            continue
        rest = line[len("#SBATCH"):]
        if rest and not rest[0].isspace():
            continue  # #SBATCHX is not a directive
        if commands_began:
            found.ignored.append(number)
            continue
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise ScriptError(f"{source}:{number}: {exc} in {stripped!r}") from None
        _options(words, number, found)
    return found


def _options(words: list[str], number: int, found: Directives) -> None:
    at = f"{found.source}:{number}"
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word in ("hetjob", "packjob") or word.startswith(":"):
            raise ScriptError(f"{at}: a heterogeneous job: estimate each of its components as a script of its own")
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            if not equals and name not in LONG_FLAGS and i < len(words) and not words[i].startswith("-"):
                value, i = words[i], i + 1
            if name not in PRICED:
                guesses = [p for p in PRICED if len(name) >= 3 and p.startswith(name)]
                if len(guesses) == 1:
                    raise ScriptError(f"{at}: write --{name} out as --{guesses[0]}, so that it is priced as sbatch reads it")
                continue
        elif word.startswith("-") and len(word) > 1:
            letter, value = word[1], word[2:]
            if letter in SHORT_FLAGS:
                continue
            if not value and i < len(words):
                value, i = words[i], i + 1
            if letter not in SHORT:
                continue
            name = SHORT[letter]
        else:
            raise ScriptError(f"{at}: {word!r} is not an option")
        if not value:
            raise ScriptError(f"{at}: --{name} needs a value")
        found.options[name] = (value, number)


def _count(value: str, what: str, at: str, *, low: int = 1, whole: str | None = None) -> int:
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= LIMIT:
        raise ScriptError(f"{at}: --{what} {whole or repr(value)} is not a whole number from {low} to {LIMIT:,}")
    return int(value)


def _most_nodes(value: str, at: str) -> int:
    """--nodes N, MIN-MAX or a list of sizes: the most it may get, which is what may be charged."""
    return max(_count(size, "nodes", at, whole=repr(value)) for size in re.split(r"[-,]", value))


def _gpus(value: str, what: str, at: str, *, gres: bool) -> int:
    """GPUs in --gpus TYPE:N / N (and lists), or in --gres gpu[:TYPE]:N (other GRES are not GPUs)."""
    total = 0
    for item in value.split(","):
        item = item.strip()
        if gres:
            item = item.removeprefix("gres/")
            kind, _, rest = item.partition(":")
            if kind != "gpu":
                continue
            count = rest.rpartition(":")[2] if rest else "1"
        else:
            count = item.rpartition(":")[2]
        count = count.split("(")[0]
        if not count.isascii() or not count.isdigit():
            raise ScriptError(f"{at}: --{what} {value!r}: want a count of GPUs, such as gpu:2 or a100:2" if gres else
                              f"{at}: --{what} {value!r}: want a count of GPUs, such as 2 or a100:2")
        total += _count(count, what, at, low=0)
    return total


def _array_tasks(value: str, at: str) -> int:
    spec = value.partition("%")[0]
    tasks = 0
    for part in spec.split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        try:
            a, b, s = int(first), int(last or first), int(step or 1)
        except ValueError:
            raise ScriptError(f"{at}: --array {value!r} is not an array spec such as 0-99 or 1,3,5-9:2") from None
        if a < 0 or b < a or s < 1:
            raise ScriptError(f"{at}: --array {value!r} is not an array spec such as 0-99 or 1,3,5-9:2")
        tasks += (b - a) // s + 1
    return tasks


@dataclass
class JobSize:
    account: str | None
    minutes: int
    cpus: int
    gpus: int
    nodes: int
    partition: str | None
    qos: str | None
    system: str | None
    array_tasks: int = 1

    def quote_request(self) -> dict[str, Any]:
        return {"account": self.account, "minutes": self.minutes, "cpus": self.cpus, "gpus": self.gpus,
                "nodes": self.nodes, "partition": self.partition, "qos": self.qos, "system": self.system}


def _minutes(value: str, at: str) -> int:
    from shared.slurm.values import time_limit_minutes

    minutes = time_limit_minutes(value)
    if minutes is None or minutes <= 0:
        if value.strip().upper() in ("UNLIMITED", "INFINITE", "-1"):
            raise ScriptError(f"{at}: --time {value!r} has no limit to price: give --time")
        raise ScriptError(f"{at}: --time {value!r} is not a time limit such as 90, 02:00:00 or 1-12:00:00")
    return minutes


def job_size(found: Directives, overrides: Mapping[str, str | None]) -> JobSize:
    """What the job asks for, from its directives, then SBATCH_* variables, then the command line
    (sbatch's order). Nodes, CPUs and GPUs are the most it may be given."""
    from shared.events import NAME

    values: dict[str, tuple[str, str]] = {k: (v, f"{found.source}:{n}") for k, (v, n) in found.options.items()}
    for name, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            values[name] = (os.environ[variable], variable)
    for name, value in overrides.items():
        if value is not None:
            values[name] = (value, f"--{name}")

    def given(name: str) -> tuple[str, str] | None:
        return values.get(name)

    def number(name: str) -> int | None:
        got = given(name)
        return _count(got[0], name, got[1]) if got else None

    def gpus_in(name: str, times: int) -> int:
        got = given(name)
        return times * _gpus(got[0], name, got[1], gres=name == "gres") if got else 0

    time, node_count = given("time"), given("nodes")
    if time is None:
        raise ScriptError(f"{found.source}: no #SBATCH --time (-t): the partition's default would apply, which "
                          "this estimate cannot know; give --time")
    minutes = _minutes(*time)
    nodes = _most_nodes(*node_count) if node_count else 1
    per_node = number("ntasks-per-node")
    ntasks = number("ntasks") or (nodes * per_node if per_node else nodes)
    # GPUs in all, per job, node or task (--gres counts per node): the most any of them asks.
    gpus = max(gpus_in("gpus", 1), gpus_in("gpus-per-node", nodes), gpus_in("gpus-per-task", ntasks),
               gpus_in("gres", nodes))
    cpus = ntasks * (number("cpus-per-task") or 1)
    per_gpu = number("cpus-per-gpu")
    if per_gpu and gpus:
        cpus = max(cpus, gpus * per_gpu)
    names: dict[str, str | None] = {}
    for name in ("account", "partition", "qos", "clusters"):
        got = given(name)
        if got is None:
            names[name] = None
            continue
        value, at = got[0].strip(), got[1]
        if "," in value:
            raise ScriptError(f"{at}: --{name} {value!r} names several: the estimate prices one, give --{name}"
                              if name != "clusters" else f"{at}: --clusters {value!r} names several: give --system")
        if not NAME.fullmatch(value):
            raise ScriptError(f"{at}: --{name} {value!r} is not a name (letters, digits, '.', '_', '-', '@', '+')")
        names[name] = value
    for name, product in (("CPUs", cpus), ("GPUs", gpus)):
        if product > LIMIT:
            raise ScriptError(f"{found.source}: {product:,} {name} in all: more than {LIMIT:,}")
    array = given("array")
    return JobSize(names["account"], minutes, cpus, gpus, nodes, names["partition"], names["qos"], names["clusters"],
                   _array_tasks(*array) if array else 1)


def _read_script(script: str) -> str:
    if script == "-":
        return sys.stdin.read(1 << 20)
    path = Path(script)
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 20)  # the directives are at the top
    except IsADirectoryError:
        raise InvalidInput(f"{script} is a directory, not a batch script") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {script}: {exc.strerror or exc}") from None
    if b"\0" in head:
        raise InvalidInput(f"{script} is not a batch script (it holds binary data)")
    return head.decode("utf-8", errors="replace")


def estimate(
    script: Annotated[str, typer.Argument(metavar="SCRIPT", help="The batch script (- for standard input).")],
    account: Annotated[str | None, typer.Option("--account", "-A", help="Price it on this account, whatever the script says.")] = None,
    time: Annotated[str | None, typer.Option("--time", "-t", help="Its time limit, whatever the script says.")] = None,
    partition: Annotated[str | None, typer.Option("--partition", "-p", help="Its partition, whatever the script says.")] = None,
    qos: Annotated[str | None, typer.Option("--qos", "-q", help="Its QoS, whatever the script says.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-M", help="The system (cluster) it would run on.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Price a batch script from its #SBATCH lines, as sbatch reads them: the most it may cost and
    whether its account can pay that now (exit 1 if not). Options given here override the script's."""
    found = read_directives(_read_script(script), "<stdin>" if script == "-" else script)
    for number in found.ignored:
        typer.echo(f"warning: {found.source}:{number}: #SBATCH after the first command: sbatch ignores it, "
                   "and so does this estimate", err=True)
    size = job_size(found, {"account": account, "time": time, "partition": partition, "qos": qos, "clusters": system})
    api = Api()
    if size.account is None:
        mine = _listed(api.get("projects"), "projects")
        if len(mine) != 1:
            raise ScriptError(f"{found.source}: no #SBATCH --account (-A): give --account, one of your projects "
                              f"({', '.join(str(p.get('name')) for p in mine) or 'you have none'})")
        size.account = str(mine[0].get("name"))
    quote = api.post("quotes", size.quote_request())
    if not isinstance(quote, dict):
        raise ApiError("the API's quote is not a JSON object")
    total, available = _money(quote.get("total")), _money(quote.get("available"))
    if as_json:
        emit_json({**quote, "request": size.quote_request(), "array_tasks": size.array_tasks})
    else:
        described = ", ".join(_counted(n, label) for n, label in
                              ((size.cpus, "CPU"), (size.gpus, "GPU"), (size.nodes, "node")) if n)
        where = ", ".join(f"{k} {v}" for k, v in (("partition", size.partition), ("qos", size.qos),
                                                  ("system", size.system)) if v)
        done(f"{found.source}: {described} for {size.minutes} minutes on {quote.get('account', size.account)}"
             + (f" ({where})" if where else ""))
        lines = [{k: _money(v) if k in ("hours", "quantity", "rate", "multiplier", "cost") else v
                  for k, v in line.items()} for line in quote.get("lines") or [] if isinstance(line, dict)]
        emit_rows(lines, ["resource", "service", "count", "hours", "quantity", "rate", "multiplier", "cost"],
                  as_json=False)
        done(f"at most {display(total) if total is not None else '?'}"
             + (f" a task, {display(total * size.array_tasks)} for its {size.array_tasks} array tasks"
                if size.array_tasks > 1 and total is not None else ""))
        credit = _money(quote.get("credit_limit"))
        done(f"available {display(available) if available is not None else '?'}"
             + (f" (credit limit {display(credit)})" if credit else "") + ": "
             + ("can pay" if quote.get("affordable") else "CANNOT pay"))
    if not quote.get("affordable"):
        raise typer.Exit(1)
