"""The package map of documentation/architecture.md: imports point down the pipeline, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mipseg"
# Pipeline order of the stage folders; equal ranks are siblings that must not import each other.
STAGE_RANK = {
    "synthetic": 0,
    "planning": 1,
    "pseudolabel": 2,
    "propagation": 2,
    "training": 3,
    "inference": 4,
    "refine": 5,
    "evaluation": 5,
    "annotate": 5,
    "analysis": 5,
    "selection": 6,
    "ship": 7,
}
ENTRY_POINTS = ("cli", "demo_report")  # the top: they may import anything, nothing imports them
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mipseg":
            if node.module == "mipseg":
                found += [f"mipseg.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "mipseg"]
    return found


def _layer(module: str) -> tuple[str, str | None]:
    """("entry" | "stage" | "shared", stage name) of a module ``mipseg.x...``."""
    parts = module.split(".")
    if len(parts) < 2:
        return "shared", None
    if parts[1] in ENTRY_POINTS:
        return "entry", None
    if parts[1] in STAGE_RANK:
        return "stage", parts[1]
    return "shared", None


def test_imports_point_down_the_pipeline() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        kind, stage = _layer(module)
        for target in _imported_modules(path):
            target_kind, target_stage = _layer(target)
            if kind != "entry" and target_kind == "entry":
                violations.append(f"{module} imports the entry point {target}")
            elif kind == "shared" and target_kind == "stage":
                violations.append(f"{module} (shared layer) imports the stage module {target}")
            elif kind == "stage" and target_kind == "stage" and target_stage != stage:
                if STAGE_RANK[target_stage] >= STAGE_RANK[stage]:
                    violations.append(
                        f"{module} ({stage}) imports {target} ({target_stage}), not an earlier stage"
                    )
    assert not violations, "\n".join(violations)


def test_every_stage_folder_is_in_the_map() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders - set(ENTRY_POINTS) == set(STAGE_RANK), "add new stage folders to STAGE_RANK"


def test_no_module_over_the_size_limit() -> None:
    sizes = {
        path.relative_to(PACKAGE.parent): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}
