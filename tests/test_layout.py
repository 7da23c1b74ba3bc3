"""The house rules of the layout, read from the code: services import only shared/ and their own
package; nothing in shared/ imports a service or the CLI; every price goes through shared/rating."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def ours(path: Path) -> set[str]:
    return {name for name in imports(path) if name.split(".")[0] in ("shared", "services", "openacct")}


@pytest.mark.parametrize("path", sorted((ROOT / "services").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_service_imports_only_shared_and_its_own_package(path: Path) -> None:
    own = ".".join(path.relative_to(ROOT).parts[:2])  # services.charger
    strays = {name for name in ours(path) if not name.startswith(("shared", own))}
    assert not strays, f"{path.relative_to(ROOT)} imports {sorted(strays)}"


@pytest.mark.parametrize("path", sorted((ROOT / "shared").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_imports_no_service_nor_the_cli(path: Path) -> None:
    strays = {name for name in ours(path) if not name.startswith("shared")}
    assert not strays, f"{path.relative_to(ROOT)} imports {sorted(strays)}"


def test_money_is_rounded_in_one_place() -> None:
    """Prices and shares of them are rounded (half up, once) by shared/rating/price.py alone: a
    second rounding rule is how the automatic and the requested refunds came to disagree. The
    display of amounts (shared/money.py) rounds how an amount is shown, never an amount kept."""
    rounding_elsewhere = [
        str(path.relative_to(ROOT))
        for path in sorted([*(ROOT / "shared").rglob("*.py"), *(ROOT / "services").rglob("*.py"),
                            *(ROOT / "openacct").rglob("*.py")])
        if path not in (ROOT / "shared" / "rating" / "price.py", ROOT / "shared" / "money.py")
        and "ROUND_HALF" in path.read_text()
    ]
    assert rounding_elsewhere == []
