"""Property-based fuzzing of `mixtral serve` with schemathesis, generated from the server's own /openapi.json.

For every route, schemathesis generates requests that match the published request schema (positive) and, for
the routes that take input, requests that break it (negative: wrong types, missing fields, out-of-schema
values). Every reply must be no 5xx, a documented status with a documented content type and a body (or, for
streams, every event) matching the published response schema, and every negative request must be refused with
a 4xx. After each route's batch the server still answers a good request. The examples are derandomized, so a
run is reproducible; the number of distinct bad requests is printed (`pytest -s`).

Not checked: that every schema-valid request is accepted. Range rules (max_new_tokens against the context, a
role's name, an empty prompt) live in the routes, with each protocol's wording, not in the schema.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import serve_in_thread
from mixtral import load
from mixtral.engine import Engine
from mixtral.server import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 100}  # per route


@pytest.fixture(scope="module")
def fuzzed(tiny_chat_model):
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=32, max_total_tokens=128)
    with serve_in_thread(create_app(engine, "tiny-mixtral")) as url:
        yield url, schemathesis.openapi.from_url(f"{url}/openapi.json")
    engine.close()


def fuzz(url: str, operation, mode: GenerationMode, statuses: Counter, bad_inputs: set, failures: list) -> None:
    """EXAMPLES[mode] requests to one route; what they got, and what failed a check, into the collections."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case):
        response = case.call(base_url=url, timeout=60)
        statuses[(operation.label, response.status_code)] += 1
        if mode is GenerationMode.NEGATIVE:
            bad_inputs.add(json.dumps([operation.label, case.path_parameters, case.query, case.headers, case.body],
                                      sort_keys=True, default=repr))
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # schemathesis raises a group of failures
            failures.append(f"{operation.label} {mode.value} -> {response.status_code}: "
                            f"{str(exc).splitlines()[0]}\n  reproduce: {case.as_curl_command()}")

    one()


def test_every_route_against_its_published_schema(fuzzed):
    url, schema = fuzzed
    statuses: Counter = Counter()
    bad_inputs: set[str] = set()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    for operation in operations:
        # a negative example needs input that can break the schema: a body (a path's string parameter cannot)
        for mode in EXAMPLES if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]:
            fuzz(url, operation, mode, statuses, bad_inputs, failures)
            good = httpx.post(f"{url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
                              timeout=60)
            assert good.status_code == 200 and good.json()["generated_text"] is not None, operation.label
    print(f"\nfuzzing: {sum(statuses.values())} requests, {len(bad_inputs)} distinct bad ones; by route and status: "
          + ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(statuses.items())))
    assert not failures, "\n".join(failures[:20])
    assert not [s for (_, s) in statuses if s >= 500]
    assert len(bad_inputs) >= 300  # the negative examples really were distinct requests
