"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis).

Every operation gets generated requests with an admin key: valid ones (positive mode) and ones
the document forbids (negative mode). The API must never answer 5xx, and every answer must match
the document: a documented status code, media type and headers, and a body valid against the
documented schema; input the document forbids must be refused, and so must a request without
its key. Half the examples aim at a memory that exists, so the success paths are fuzzed too, not
only the 404s.

(schemathesis' pytest integration does not run under pytest 9, so the operations are driven
through its strategies directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from governance import ApiKeys, MemWarden, create_app

EXAMPLES_PER_OPERATION = 25
SEEDED_MEMORY = "fuzz-target"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


def _has_inputs(operation: schemathesis.APIOperation) -> bool:
    return bool(operation.path_parameters or operation.query or operation.body)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_to_the_schema(database_url: str, mode: GenerationMode) -> None:
    with MemWarden.open(database_url, actor="test:setup") as memwarden:
        admin = ApiKeys(memwarden).issue(tenant="*", subject="fuzzer", role="admin")
        memwarden.add("a memory the fuzzer may find", tenant="acme", owner="user:1",
                      cube_id=SEEDED_MEMORY)
        memwarden.update(SEEDED_MEMORY, text="its second version", reason="so diffs exist")
        headers = {"Authorization": f"Bearer {admin.secret}"}
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(memwarden))
        fuzzed = []
        for result in schema.get_all_operations():
            operation = result.ok()
            if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
                continue  # nothing to get wrong
            strategies = [operation.as_strategy(mode)]
            if "cube_id" in {p.name for p in operation.path_parameters}:
                strategies.append(operation.as_strategy(
                    mode, path_parameters={"cube_id": SEEDED_MEMORY}))

            @given(case=st.one_of(strategies))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def conforms(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS)

            conforms()
            fuzzed.append(operation.label)
    assert len(fuzzed) >= 14, fuzzed  # every route of issue #3 that takes input, at least
