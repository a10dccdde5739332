"""The public surface of each package, and the direction of the dependencies between them.

Implementation modules are private (``_store.py``); each package re-exports a curated
``__all__``. The names below are the event-sourced core's (issue #2): removing or renaming one
breaks users, so it must be a deliberate act that updates this list. Later work adds names; the
other tests check that whatever is exported is importable and public.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

PUBLIC_NAMES = {
    "eventstore": {
        "ANY_VERSION", "GENESIS_HASH", "BackendError", "ChainBreak", "ConcurrencyError",
        "EventContext", "EventStore", "EventStoreError", "NewEvent", "StoredEvent",
        "StreamAppend", "UTCDateTime", "UpcastError", "Upcaster", "Upcasters",
        "VerificationReport", "canonical_json", "utcnow",
    },
    "projections": {
        "MAX_PAGE", "AuditEntry", "AuditFilter", "CubeFilter", "ReadModels", "Usage", "Version",
        "cube_as_of", "resolve_position", "tenant_as_of", "ACTIVE", "CUBE_EVENT_TYPES",
        "DELETED", "MEMORY_ACCESSED", "MEMORY_CREATED", "MEMORY_DELETED", "MEMORY_RESTORED",
        "MEMORY_ROLLED_BACK", "MEMORY_UPDATED", "AuditProjection", "CorruptStream",
        "CubesProjection", "MemoryState", "ProgressCallback", "Projection", "ProjectionRunner",
        "UsageProjection", "VersionsProjection", "audit", "cube_labels", "cubes",
        "default_projections", "evolve", "reads", "replay", "state_from_row", "usage",
        "versions",
    },
    "governance": {
        "ENVIRONMENT_VARIABLES", "KINDS", "SEMANTIC_TYPES", "SOURCES", "AuditEntry",
        "AuditFilter", "ConfigError", "CubeFilter", "Diff", "EmptyText", "InvalidCommand",
        "Limits", "MalformedMetadata", "MemCube", "MemWarden", "MemWardenError",
        "MemoryMetadata", "MemoryState", "NotFound", "Settings", "StateConflict",
        "TextTooLarge", "Usage", "Version", "VersionConflict", "VersionNotFound", "diff_states",
        "state_as_dict",
    },
}

# What each package may import from MemWarden: governance -> projections -> eventstore.
MAY_IMPORT = {
    "eventstore": set(),
    "projections": {"eventstore"},
    "governance": {"eventstore", "projections"},
}
OUR_PACKAGES = {"eventstore", "projections", "governance", "dashboard"}

PACKAGES = sorted(PUBLIC_NAMES)


def package(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", PACKAGES)
def test_the_core_public_names_stay_exported(name: str) -> None:
    exported = package(name).__all__

    assert len(exported) == len(set(exported)), "duplicates in __all__"
    assert sorted(PUBLIC_NAMES[name] - set(exported)) == []


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_can_be_imported(name: str) -> None:
    module = package(name)
    namespace: dict[str, object] = {}

    exec(f"from {name} import *", namespace)

    assert {n for n in namespace if n != "__builtins__"} == set(module.__all__)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize("name", PACKAGES)
def test_nothing_private_leaks(name: str) -> None:
    module = package(name)

    assert [n for n in module.__all__ if n.startswith("_")] == []
    unexported = [n for n in vars(module) if not n.startswith("_") and n not in module.__all__
                  and not isinstance(getattr(module, n), ModuleType)]
    assert unexported == []


@pytest.mark.parametrize("name", PACKAGES)
def test_exported_classes_and_functions_have_public_names(name: str) -> None:
    module = package(name)

    objects = [getattr(module, n) for n in module.__all__]
    named = [o for o in objects if isinstance(o, type) or callable(o)]
    assert [o for o in named if getattr(o, "__name__", "x").startswith("_")] == []


def imported_packages(source: Path) -> set[str]:
    """Top-level MemWarden packages named by the import statements of one source file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OUR_PACKAGES


def sources_of(name: str) -> list[Path]:
    return sorted((ROOT / name).rglob("*.py"))


@pytest.mark.parametrize("name", sorted(MAY_IMPORT))
def test_dependencies_point_one_way(name: str) -> None:
    sources = sources_of(name)
    assert sources, f"no sources found for {name}"

    wrong_way = {str(source.relative_to(ROOT)): sorted(found)
                 for source in sources
                 if (found := imported_packages(source) - MAY_IMPORT[name] - {name})}

    assert wrong_way == {}


def test_no_package_imports_relatively() -> None:
    relative = [str(source.relative_to(ROOT))
                for name in MAY_IMPORT for source in sources_of(name)
                if any(isinstance(node, ast.ImportFrom) and node.level
                       for node in ast.walk(ast.parse(source.read_text())))]

    assert relative == []


def test_the_import_scanner_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("import json\n\ndef f():\n    from governance._sdk import MemWarden\n"
                      "    import projections.x as p\n")

    assert imported_packages(source) == {"governance", "projections"}
