import numpy as np
import pytest

from services.common.errors import ValidationFailed
from services.inference.deployments import DeploymentSpec, Route, canary_bucket
from services.inference.sampling import Penalties, SamplingParams, StopScanner, choose, log_softmax, most_likely

LOGITS = np.array([0.1, 3.0, 2.9, -1.0, 0.5], np.float32)


def test_greedy_takes_the_argmax():
    assert choose(LOGITS, SamplingParams(), np.random.default_rng(0)) == 1


def test_top_k_one_is_greedy_and_top_k_two_never_leaves_the_top_two():
    rng = np.random.default_rng(0)
    assert {choose(LOGITS, SamplingParams(temperature=1.0, top_k=1), rng) for _ in range(50)} == {1}
    assert {choose(LOGITS, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)} == {1, 2}


def test_top_p_keeps_the_nucleus_only():
    rng = np.random.default_rng(0)
    picks = {choose(LOGITS, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert picks == {1, 2}  # p(1) ~ 0.47 < 0.5, so token 2 completes the nucleus


def test_seed_reproduces_and_low_temperature_sharpens():
    params = SamplingParams(temperature=1.0, seed=3)
    first = [choose(LOGITS, params, rng) for rng in [params.rng()] for _ in range(20)]
    again = [choose(LOGITS, params, rng) for rng in [params.rng()] for _ in range(20)]
    assert first == again
    cold = SamplingParams(temperature=0.05, seed=1)
    rng = cold.rng()
    assert {choose(LOGITS, cold, rng) for _ in range(50)} <= {1, 2}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=-0.1), SamplingParams(temperature=2.5), SamplingParams(top_p=0.0),
    SamplingParams(top_k=-1), SamplingParams(stop=("",)), SamplingParams(stop=("a",) * 5),
])
def test_out_of_range_parameters_are_refused(params):
    with pytest.raises(ValidationFailed):
        params.validate()


def test_stop_scanner_holds_back_possible_stops_and_cuts_before_them():
    scanner = StopScanner(("END",))
    assert scanner.feed("hello E") == "hello "
    assert scanner.feed("hello EN") == ""
    assert scanner.feed("hello ENX") == "ENX"
    assert scanner.feed("hello ENX and END more") == " and "
    assert scanner.stopped


def test_stop_scanner_holds_an_incomplete_character_and_flushes_at_the_end():
    scanner = StopScanner(())
    assert scanner.feed("ab\ufffd") == "ab"
    assert scanner.flush("ab\ufffd") == "\ufffd"


def test_canary_bucket_is_sticky_and_uniform_enough():
    buckets = [canary_bucket(f"k{i}") for i in range(5000)]
    assert buckets[:10] == [canary_bucket(f"k{i}") for i in range(10)]
    share = sum(b < 20 for b in buckets) / len(buckets)
    assert 0.17 < share < 0.23


def test_route_without_canary_weight_always_takes_stable():
    route = Route(stable="s", canary="c", weight=0)  # type: ignore[arg-type]
    assert {route.pick(f"k{i}")[0] for i in range(100)} == {"s"}
    everything = Route(stable="s", canary="c", weight=100)  # type: ignore[arg-type]
    assert {everything.pick(f"k{i}") for i in range(100)} == {("c", True)}


@pytest.mark.parametrize("spec", [
    DeploymentSpec("Bad Name", "m", 1), DeploymentSpec("d", "m", 0), DeploymentSpec("d", "m", 1, 2, 101),
    DeploymentSpec("d", "m", 1, None, 10),
])
def test_invalid_deployments_are_refused(spec):
    with pytest.raises(ValidationFailed):
        spec.validate()


def test_penalties_lower_the_generated_tokens_by_presence_once_and_frequency_per_occurrence():
    penalties = Penalties(SamplingParams(presence_penalty=0.5, frequency_penalty=2.0), vocab=5)
    for token in (1, 1, 2):
        penalties.add(token)
    assert penalties.apply(LOGITS).tolist() == pytest.approx([0.1, 3.0 - 0.5 - 4.0, 2.9 - 0.5 - 2.0, -1.0, 0.5])
    assert choose(penalties.apply(LOGITS), SamplingParams(), np.random.default_rng(0)) == 4  # 1 and 2 fell below
    untouched = Penalties(SamplingParams(), vocab=5)
    untouched.add(1)
    assert untouched.apply(LOGITS) is LOGITS  # no penalty: no copy per token


def test_log_softmax_is_normalised_and_most_likely_orders_by_probability():
    logprobs = log_softmax(LOGITS)
    assert np.exp(logprobs).sum() == pytest.approx(1.0)
    assert logprobs[1] - logprobs[2] == pytest.approx(0.1, abs=1e-6)  # differences of logits survive
    assert [token for token, _ in most_likely(logprobs, 3)] == [1, 2, 4]
    assert most_likely(logprobs, 0) == [] and len(most_likely(logprobs, 50)) == 5


def test_each_choice_has_its_own_reproducible_generator_and_choice_zero_is_the_lone_requests():
    params = SamplingParams(temperature=1.0, seed=5)
    draws = {choice: params.rng(choice).random(4).tolist() for choice in range(3)}
    assert draws[0] == np.random.default_rng(5).random(4).tolist()
    assert draws[1] == params.rng(1).random(4).tolist() and len({tuple(d) for d in draws.values()}) == 3


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_out_of_range_are_refused(field):
    with pytest.raises(ValidationFailed, match=field):
        SamplingParams(**{field: 2.5}).validate()
