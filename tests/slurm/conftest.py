"""The live Slurm tier: one real Slurm for the whole session (``harness.Slurm``), skipped with
the reason where this machine cannot run one. Every test under tests/slurm/ is marked ``slurm``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shared import db
from tests.pipeline import OPENACCT
from tests.slurm.harness import Slurm, unavailable
from tests.slurm.lab import RATE

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # this hook sees the whole session's items, not only ours
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no live Slurm: {reason}")
    # Not under pytest's tmp (mode 700): every user's sbatch must read slurm.conf.
    directory = Path(tempfile.mkdtemp(prefix="openacct-slurm-"))
    directory.chmod(0o755)
    harness = Slurm(directory)
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()
        shutil.copytree(directory / "log", tmp_path_factory.mktemp("slurm-logs"), dirs_exist_ok=True)
        shutil.copytree(directory / "hooks", tmp_path_factory.mktemp("slurm-hooks"), dirs_exist_ok=True)
        shutil.rmtree(directory)


@pytest.fixture
def slurm_spool(slurm: Slurm, tmp_path: Path) -> Iterator[Path]:
    """This test's own spool for the hooks' events. Its jobs are cancelled at its end, so none
    of them ends up in the next test's spool."""
    path = tmp_path / "spool"
    slurm.set_hook_env(OPENACCT_SPOOL_DIR=str(path))
    yield path
    slurm.cancel_all()
    slurm.set_hook_env(OPENACCT_SPOOL_DIR=str(slurm.directory / "spool"))


@pytest.fixture
def lab(committed: Engine, slurm: Slurm) -> Engine:
    """The center: the Slurm cluster is a system with core-hours at RATE; root leads project lab
    (its default account is lab), labuser is a member. `openacct slurm sync` creates the Slurm
    side, which enforces associations."""
    from openacct import shortcuts as oa

    with db.session_scope():
        system = oa.create_system(slurm.cluster)
        service = oa.create_service(f"{slurm.cluster}-core-hours", system=system, units="core-hours",
                                    charge_rate=str(RATE))
        oa.create_user("root")
        oa.create_user("labuser")
        oa.create_project("lab", pi="root", description="The lab")
        oa.grant_service_access(service, project="lab")
        oa.add_user_to_project("labuser", "lab")
        oa.deposit("lab", "1000", start="2000-01-01")
    slurm.ensure_user("labuser")  # slurmctld maps associations to uids
    synced = subprocess.run([OPENACCT, "slurm", "sync", "--cluster", slurm.cluster], env=slurm.env,
                            capture_output=True, text=True, timeout=60)
    assert synced.returncode == 0, synced.stderr
    listed = slurm.run("sacctmgr", "-nP", "show", "associations", f"cluster={slurm.cluster}",
                       "format=account,user").stdout.split()
    assert {"lab|root", "lab|labuser"} <= set(listed)
    return committed
