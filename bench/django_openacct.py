"""django-openacct 0.0.5 recording a jobcomp backfill file, the baseline for OpenAcct's file-to-charged.

    python bench/django_openacct.py DATABASE_URL FILE

Run by bench/ingest.py with a virtualenv of its own (django-openacct's package is also named
``openacct``), never beside OpenAcct's. It does what that package's README shows a site doing:
its System, Service, users and projects made with its shortcuts, then, for each jobcomp record of
FILE, ``record_transaction`` (a DEBIT, charged at the service's rate) and ``record_job`` linking
the two, in process, under Django's default autocommit, names looked up as the records give them.
Prints one JSON line: {"jobs": N, "seconds": S}, timed from the first record read to the last
recorded.
"""

# ruff: noqa: I001 -- "openacct" here is django-openacct's package, which ruff takes for OpenAcct's own
from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

CORE_HOUR_RATE = 1.0  # the service's charge_rate; the same rate OpenAcct's quickstart sets


def configure(database_url: str) -> None:
    import django
    from django.conf import settings

    url = urlsplit(database_url)
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "openacct"],
        DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
            "HOST": url.hostname, "PORT": url.port or 5432, "USER": url.username or "",
            "PASSWORD": url.password or "",
        }},
        USE_TZ=True, DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


def prepare() -> None:
    from django.core.management import call_command
    from openacct.models import Service, System, User
    from openacct.shortcuts import add_user_to_project, create_project, grant_service_access

    call_command("migrate", verbosity=0)
    system = System.objects.create(name="cluster")
    Service.objects.create(name="cluster-core-hours", units="core-hours", system=system,
                           charge_rate=CORE_HOUR_RATE)
    for name in ("bob", "tux", "sue"):
        User.objects.create(name=name)
    create_project("phys", "bob", account_name="phys")
    create_project("chem", "sue", account_name="chem")
    add_user_to_project("tux", "phys")
    add_user_to_project("tux", "chem")
    for project in ("phys", "chem"):
        grant_service_access("cluster-core-hours", project=project)


def seconds(limit: str) -> int:
    hours, minutes, secs = (int(part) for part in limit.split(":"))
    return hours * 3600 + minutes * 60 + secs


def record(line: bytes) -> None:
    from openacct.shortcuts import record_job, record_transaction

    env = json.loads(line)
    start, end = int(env["START"]), int(env["END"])
    core_hours = int(env["PROCS"]) * (end - start) / 3600
    transaction = record_transaction(core_hours, "cluster-core-hours", env["USERNAME"], account=env["ACCOUNT"],
                                     amt_charged=core_hours * CORE_HOUR_RATE)
    stamp = datetime.fromtimestamp
    record_job(env["JOBID"], stamp(int(env["SUBMIT"]), UTC), seconds(env["LIMIT"]), name=env["JOBNAME"],
               host_list=env["NODES"], qos=env["QOS"], started=stamp(start, UTC), completed=stamp(end, UTC),
               wall_duration=end - start, transactions=transaction)


def main() -> None:
    database_url, path = sys.argv[1:3]
    configure(database_url)
    prepare()
    from openacct.models import Job, Transaction

    jobs = 0
    started = time.monotonic()
    with open(path, "rb") as lines:
        for line in lines:
            record(line)
            jobs += 1
    elapsed = time.monotonic() - started
    # Recorded, not just called: every job is there with its charged transaction.
    assert Job.objects.count() == jobs, (Job.objects.count(), jobs)
    assert Transaction.objects.filter(tx_type="DEBIT", job__isnull=False).count() == jobs
    print(json.dumps({"jobs": jobs, "seconds": elapsed}))


if __name__ == "__main__":
    main()
