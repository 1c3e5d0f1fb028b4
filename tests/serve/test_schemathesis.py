"""Property-based API testing with schemathesis against /openapi.json (fake engine): whatever it sends, no 5xx, and
every response matches the documented status codes, content types and schemas.

Driven through hypothesis directly (one `@given` per operation) rather than schemathesis' pytest plugin, whose
fixture loader does not work with the pytest in use here (it reads `request.node._nodeid`).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from gptforge.serve.app import AppSettings, create_app  # noqa: E402
from tests.serve.utils import make_service, running_server  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tokenizer_run):
    from gptforge.tokenizer.bpe import Tokenizer

    tok = Tokenizer.load(tokenizer_run / "tokenizer")
    # A large queue so generated bursts are not 429s; requests are cheap on the fake engine.
    service = make_service(tok, max_seq_len=64, max_batch_size=8, max_waiting=1000)
    # A real server (not schemathesis' in-process ASGI client, whose lifespan handling shut the app down early).
    with running_server(create_app(service, AppSettings(max_body_bytes=64 << 10))) as (url, _):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def operations(schema):
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_every_route_is_covered(api_schema):
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health/ready"} <= set(
        operations(api_schema)
    )


POSTS = ["POST /v1/chat/completions", "POST /v1/completions"]
GETS = ["GET /v1/models", "GET /health/live", "GET /health/ready", "GET /metrics"]
# A GET without parameters has no invalid input to generate, so negative mode is for the POST routes only.
CASES = [(n, "positive") for n in POSTS + GETS] + [(n, "negative") for n in POSTS]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_api_conforms_and_never_5xx(api_schema, name, mode):
    op = operations(api_schema)[name]
    statuses = set()
    examples = 150 if name.startswith("POST") else 20

    @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        # positive_data_acceptance is left out on purpose: a schema-valid request can still get a 400 that no JSON
        # schema can express (prompt + max_tokens over the context, a system message that is not first).
        statuses.add(case.call_and_validate(excluded_checks=[positive_data_acceptance]).status_code)

    check()
    assert all(s < 500 for s in statuses)
    if mode == "positive":  # generation really ran, not only refusals
        assert 200 in statuses
    elif name.startswith("POST"):
        assert statuses <= {400, 404, 413}, statuses
