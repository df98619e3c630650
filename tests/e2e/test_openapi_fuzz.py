"""Issue 15: a fuzz run driven by `/openapi.json` alone finds no answer of the running stack that the document
does not describe.

Schemathesis reads the document the gateway serves, generates requests from it — valid ones (which must be
accepted) and invalid ones (which must be refused with a 4xx) — sends them to the stack `llmp up` started,
and checks every answer: no 5xx, a documented status, a documented content type, a body matching the
documented schema. A stateful run then follows the document's links (a created dataset version to its reads
and deletion, a submitted job to its reads and cancellation, a key to its revocation…) and checks that what
a create answers can be read, and that what was deleted is gone.

What JSON Schema cannot state, and so the document says in words only, is kept out of the *valid* requests
by the same rules the services apply (`_schema_cannot_say`). The only other allowances are named below: 412/428
for a valid request to an operation that documents preconditions, 400/422 for a corpus judged by ingest, and
413 counted as a refusal of an invalid body. Every job the run manages to submit is cancelled at once.
"""

from __future__ import annotations

import json
import os

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

from services.common import errors
from services.common.config import Settings
from services.training.spec import FleetLimits, JobSpec

# The fleet the stack runs (LLMP_TRAINING_*, their defaults there): a spec valid by the document's bounds, which
# hold on any fleet, is still too big for this one. The document states the settings' names, not their values.
FLEET = FleetLimits.from_settings(Settings.from_env({}))

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          positive_data_acceptance, negative_data_rejection, use_after_free, ensure_resource_availability]
# Examples per operation and mode; LLMP_FUZZ_EXAMPLES raises it for a longer run.
EXAMPLES = int(os.environ.get("LLMP_FUZZ_EXAMPLES", "6"))
# The statuses schemathesis accepts for a valid request (2xx, 3xx, 401, 403, 404, 409, 429, 5xx — the 5xx left
# to `not_a_server_error`), plus, for an operation that documents them, a precondition that did not hold (412)
# or was not sent (428): valid by the schema, refused by the state of the resource, as 409 is.
VALID_REFUSED = ["2xx", "3xx", "401", "403", "404", "409", "429"]
PRECONDITIONS = ["412", "428"]
# Valid requests whose refusal (400 malformed, 422 breaking a rule) is about content the document describes in
# words: a corpus is judged by ingest (UTF-8, lines of JSON holding the named fields, documents left after
# cleaning under the options), which no schema of a text body can state.
# The same for an import: an archive is judged by its members (a tar of a Hugging Face directory whose weights
# match its config), which no schema of a binary body can state.
CONTENT_JUDGED = {"post_v1_datasets", "post_v1_models_name_imports"}
# The statuses that refuse an invalid request: schemathesis' own list plus 413, the answer to a body past the
# gateway's size limit (a huge invalid body is refused before it is read whole, as the document declares).
INVALID_REFUSED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def _schema_cannot_say(case, *, issued_token: bool = False) -> bool:
    """False for a valid request that breaks a rule the document states in words only: a page token the server
    did not issue (any URL-safe base64 fits the pattern), a cross-field rule of a dataset's options or a
    training spec (checked with the training service's own `JobSpec` and the stack's `FleetLimits`)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return True
    query = case.query or {}
    if query.get("page_token") and not issued_token:  # only the `NextPage` links send one
        return False
    if case.operation.path == "/v1/datasets" and case.method.upper() == "POST":
        shares = [float(share) for share in query["fractions"].split(",")] if "fractions" in query else [1.0]
        if abs(sum(shares) - 1) > 1e-6 or shares[0] <= 0:
            return False
        if int(query.get("max_doc_chars", 0)) and int(query["max_doc_chars"]) < int(query.get("min_doc_chars", 1)):
            return False
    if case.operation.path == "/v1/training-jobs" and case.method.upper() == "POST" and isinstance(case.body, dict):
        try:
            JobSpec.from_dict({key: value for key, value in case.body.items()
                               if key in ("dataset", "model", "hyperparameters", "distributed")}).check_fleet(FLEET)
        except errors.ValidationFailed:
            return False
    return True


def _no_training_left_running(case, response) -> None:
    """Cancel at once a job the fuzz submitted: a random valid spec (up to 128 layers of 16384, 10^7 steps) on a
    dataset the fuzz made must not train on the stack the other e2e tests share. Its answer is checked first."""
    if case.method.upper() == "POST" and case.operation.path == "/v1/training-jobs" \
            and response.status_code in (200, 202):
        base = response.request.url.split("/v1/training-jobs")[0]
        cancelled = requests.delete(f"{base}/v1/training-jobs/{response.json()['id']}", timeout=60,
                                    headers={"Authorization": response.request.headers["Authorization"]})
        assert cancelled.status_code == 202, cancelled.text


def load(base_url: str, key: str) -> schemathesis.BaseSchema:
    """The API as its `/openapi.json` describes it, set up to call it with `key` (an admin's)."""
    document_url = base_url + "/openapi.json"
    allowed = {}
    for item in _document(document_url)["paths"].values():
        for operation in item.values():
            statuses = VALID_REFUSED + [status for status in PRECONDITIONS if status in operation["responses"]]
            if operation["operationId"] in CONTENT_JUDGED:
                statuses += ["400", "422"]
            if statuses != VALID_REFUSED:
                allowed[operation["operationId"]] = statuses
    config = schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {key}"},
        "request-timeout": 60,
        "generation": {"max-examples": EXAMPLES, "mode": "all"},
        "checks": {"negative_data_rejection": {"expected-statuses": INVALID_REFUSED}},
        "operations": [{"include-operation-id": operation_id,
                        "checks": {"positive_data_acceptance": {"expected-statuses": statuses}}}
                       for operation_id, statuses in sorted(allowed.items())],
    })
    schema = schemathesis.openapi.from_url(document_url, config=config)
    return schema


def _document(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def api(stack):
    return load(f"http://127.0.0.1:{stack.env['LLMP_GATEWAY_PORT']}", stack.admin_key)


SETTINGS = hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                               suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])


def test_every_answer_is_one_the_document_describes(api):
    """Valid and invalid requests for every operation of the document, each answer checked against it."""
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 40  # the whole API, HEADs included
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @SETTINGS
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def one(case):
                hypothesis.assume(_schema_cannot_say(case))
                response = case.call()
                _no_training_left_running(case, response)
                case.validate_response(response, checks=CHECKS)

            try:
                one()
            except hypothesis.errors.Unsatisfiable:
                pass  # every valid request this operation drew broke a rule in words (none of them was sent)
            except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 (each reported below, with its operation)
                failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)


def test_following_the_documents_links_finds_nothing(api):
    """Chains of calls along the document's links: what a create answers can be read, what was deleted is gone."""
    machine = api.as_state_machine()
    failures: list[str] = []
    followed: list[str] = []

    class Chained(machine):
        def step(self, input):
            issued = any(name == "page_token" for _, name in input.applied_parameters)
            hypothesis.assume(_schema_cannot_say(input.case, issued_token=issued))
            if input.transition is not None:
                followed.append(input.transition.id)
            return super().step(input)

        def after_call(self, response, case):
            _no_training_left_running(case, response)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            # Recorded, not raised: a chain changed the stack, so hypothesis could not replay it to shrink it.
            try:
                case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)
            except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 (each reported below)
                failures.append(f"{case.operation.label}: {error}")

    # Hypothesis explores chains by replaying their prefixes; against a live stack a replay can take another turn
    # (a create that answered 202 now answers 200), which hypothesis calls flaky and ends the run on. Failures
    # are recorded as they happen, so an ended run loses none: it is started again until enough chains ran.
    for _ in range(4):
        try:
            Chained.run(settings=hypothesis.settings(SETTINGS, max_examples=EXAMPLES * 8, stateful_step_count=6,
                                                     derandomize=False))
            break
        except hypothesis.errors.FlakyStrategyDefinition:
            if len(followed) >= EXAMPLES * 8:
                break
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert len(followed) >= EXAMPLES, f"only {len(followed)} links followed"
    assert any(link.startswith(("POST /v1/datasets", "POST /v1/api-keys")) for link in followed), \
        "no link from a create to its reads was followed"
