"""docker-compose.yml, checked without Docker (no engine runs here): every MemWarden service runs a
command the CLI has, with options it accepts; every variable it sets is one the code reads;
the infrastructure has healthchecks and volumes, and the dependencies between services exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from governance import ENVIRONMENT_VARIABLES
from governance._cli import cli
from governance._relay import chosen_projections
from projections import default_projections

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SOURCES = [path for package in ("eventstore", "projections", "governance", "dashboard")
           for path in (ROOT / package).rglob("*.py")]
MEMWARDEN_SERVICES = {"api", "relay", "projector", "indexer", "workers", "dashboard"}
INFRASTRUCTURE = {"postgres", "kafka", "elasticsearch"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def memwarden_invocations(command: list[str]) -> list[list[str]]:
    """The argument lists of every ``memwarden`` call in a service's command, ``sh -c`` scripts
    included."""
    if command[:2] == ["sh", "-c"]:
        lexer = shlex.shlex(command[2], posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
    else:
        tokens = list(command)
    calls, current = [], None
    for token in tokens:
        if token == "memwarden":
            current = []
            calls.append(current)
        elif current is not None and (token in {";", "&&", "||", "|", "do", "done"}):
            current = None
        elif current is not None:
            current.append(token)
    return calls


def resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The CLI command ``args`` name, its path, and the arguments left for it."""
    command: click.Command = cli
    path: list[str] = []
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"memwarden {' '.join(path)} has no {args[0]!r}"
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    assert not isinstance(command, click.Group), f"memwarden {' '.join(path)} needs a subcommand"
    return command, path, args


def test_the_file_declares_the_whole_distributed_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == MEMWARDEN_SERVICES | INFRASTRUCTURE
    kafka = compose["services"]["kafka"]["environment"]
    assert "broker,controller" in kafka["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # the relay creates the topic


@pytest.mark.parametrize("service", sorted(MEMWARDEN_SERVICES))
def test_every_service_runs_a_command_the_cli_has(compose: dict[str, Any], service: str) -> None:
    calls = memwarden_invocations(compose["services"][service]["command"])
    assert calls, f"{service} runs no memwarden command"
    for args in calls:
        command, path, rest = resolve(args)
        # Parses the options exactly as the CLI would (unknown options and bad values raise).
        command.make_context(" ".join(["memwarden", *path]), list(rest))


def test_every_read_model_is_maintained_by_exactly_one_kafka_consumer(
        compose: dict[str, Any]) -> None:
    """The Kafka consumers of the stack split the read models between them: none is left
    unmaintained, none claimed twice (the second consumer would refuse to start)."""
    maintained: dict[str, str] = {}
    for name, definition in compose["services"].items():
        for args in memwarden_invocations(definition.get("command", [])):
            command, path, rest = resolve(args)
            if path != ["project"]:
                continue
            options = command.make_context("memwarden project", list(rest)).params
            assert options["source"] == "kafka", f"{name} projects from the SQL log"
            consumer = options["name"]
            for projection in chosen_projections(options["read_models"], options["excluded"]):
                assert projection.name not in maintained, (
                    f"{projection.name}: {maintained.get(projection.name)} and {consumer}")
                maintained[projection.name] = consumer
    assert set(maintained) == {p.name for p in default_projections()}
    assert maintained["search"] == "indexer" and maintained["cubes"] == "projector"


def test_the_workers_service_runs_every_lifecycle_worker(compose: dict[str, Any]) -> None:
    """Retention and conversion alike: no ``--only`` leaves one out."""
    from governance._cli_kafka import WORKERS

    [args] = memwarden_invocations(compose["services"]["workers"]["command"])
    command, path, rest = resolve(args)
    assert path == ["work"]
    only = command.make_context("memwarden work", list(rest)).params["only"]
    assert set(only or WORKERS) == {"retention", "conversion"}


def test_the_checker_rejects_what_the_cli_lacks() -> None:
    with pytest.raises(AssertionError, match="has no 'serve'"):
        resolve(["serve"])
    command, _, rest = resolve(["project", "--source", "kafka", "--partitions", "2"])
    with pytest.raises(click.NoSuchOption):
        command.make_context("memwarden project", rest)
    assert memwarden_invocations(["sh", "-c", "while true; do memwarden retention run; "
                                  "sleep 5; done"]) == [["retention", "run"]]


@pytest.mark.parametrize("service", sorted(MEMWARDEN_SERVICES))
def test_every_variable_a_service_sets_is_one_the_code_reads(
        compose: dict[str, Any], service: str) -> None:
    code = "\n".join(path.read_text() for path in SOURCES)
    definition = compose["services"][service]
    for name in definition["environment"]:
        assert name in ENVIRONMENT_VARIABLES, f"{service} sets {name}, which is undocumented"
        assert re.search(rf"\b{name}\b", code), f"{service} sets {name}, which no code reads"
    script = " ".join(definition["command"])
    for name in re.findall(r"\$\$?\{?(MEMWARDEN_[A-Z_]+)", script):
        assert name in definition["environment"], f"{service}'s command uses unset {name}"


def test_the_distributed_mode_is_on_and_every_service_shares_one_master_key(
        compose: dict[str, Any]) -> None:
    environments = [compose["services"][s]["environment"] for s in MEMWARDEN_SERVICES]
    assert all(env["MEMWARDEN_KAFKA_BOOTSTRAP"] == "kafka:9092" for env in environments)
    assert len({env["MEMWARDEN_KEY_FILE"] for env in environments}) == 1
    assert all("memwarden-data:/data" in compose["services"][s]["volumes"]
               for s in MEMWARDEN_SERVICES)


def test_health_dependencies_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in INFRASTRUCTURE | {"api"}:
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    for name, definition in services.items():
        for needed, condition in definition.get("depends_on", {}).items():
            assert needed in services, f"{name} depends on unknown {needed}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{needed} has no healthcheck"
    for name in INFRASTRUCTURE:
        mounted = [volume.split(":")[0] for volume in services[name]["volumes"]]
        assert all(volume in compose["volumes"] for volume in mounted), name
    published = [port.split(":")[0] for s in services.values() for port in s.get("ports", [])]
    assert len(published) == len(set(published))
