"""The Ray rollout pool: same outputs on 1 or 2 workers as in-process, versioned weights, failover.

Two worker actors serve the whole module (each costs seconds to start); the failover test kills
one, so it runs last. The model is M1's two layer kinds (tests/conftest.py), at about a quarter of the 8-layer
preset's time a token: this module checks the pool (shares, versions, failover); the engine's tests check layers.
"""
import itertools
import os
import signal
import typing

import pytest
import ray
import torch

from pydantic import ValidationError

from rollout.config import RolloutConfig
from rollout.engine import generate
from rollout.model import load_model
from rollout.trajectory import Request, SamplingParams
from rollout.worker import ENGINES, RolloutPool, balance
from tests.rollout.reference import teacher_forced

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 7], [1, 9, 10, 11, 12], [1, 4, 4]]


def _requests(temperature: float, budget: int = 24) -> list[Request]:
    # Identical outputs hold up to floating-point ties: batch shape moves logits by ~1e-7, which flips a
    # token only when a draw or the top-p cut sits that close to a boundary (top_p=0.95 hit one here).
    return [Request(p, n=1 + i % 3, seed=100 + i, params=SamplingParams(max_new_tokens=budget + 8 * i,
                                                                           temperature=temperature, top_p=0.9))
            for i, p in enumerate(PROMPTS)]


def _view(completions):
    return [(c.prompt_ids, c.response_ids, c.finish_reason) for c in completions]


@pytest.fixture(scope="module")
def workers(ray_session, two_layer_model_dir):
    pool = RolloutPool.start(2, str(two_layer_model_dir), 0, RolloutConfig(threads=1, max_batch_rows=4))
    yield list(pool.workers)
    pool.shutdown()


def test_balance_spreads_work_and_covers_every_request():
    requests = [Request([1] * 4, n=n, params=SamplingParams(max_new_tokens=b))
                for n, b in [(8, 100), (1, 10), (8, 90), (2, 50)]]
    shares = balance(requests, 2)
    assert sorted(i for s in shares for i in s) == [0, 1, 2, 3]
    assert 0 in shares[0] and 2 in shares[1]  # the two big requests go to different workers


def test_a_session_always_goes_to_the_worker_that_keeps_its_state():
    sessions = [7, 8, 9, 7, 11, 7]
    requests = [Request([1] * 4, params=SamplingParams(max_new_tokens=10 * (i + 1)), session=s)
                for i, s in enumerate(sessions)]
    shares = balance(requests, 3)
    assert [next(w for w, share in enumerate(shares) if i in share) for i in range(6)] == [s % 3 for s in sessions]


def test_one_or_two_workers_match_in_process(workers, two_layer_model_dir):
    model = load_model(two_layer_model_dir).eval()
    for temperature in (0.0, 1.0):
        requests = _requests(temperature)
        local = generate(model, requests, pad_id=0)
        for pool in (RolloutPool(workers), RolloutPool(workers[:1])):
            out = pool.generate(requests)
            assert _view(out) == _view(local)
            assert max(abs(a - b) for c, d in zip(out, local) for a, b in zip(c.logprobs, d.logprobs)) < 1e-5


def test_submitted_rollouts_run_while_the_caller_goes_on(workers, two_layer_model_dir):
    pool = RolloutPool(workers)
    greedy, sampled = _requests(0.0), _requests(1.0)
    first, second = pool.submit(greedy), pool.submit(sampled)  # both in flight before either is collected
    model = load_model(two_layer_model_dir).eval()
    assert _view(second.result()) == _view(generate(model, sampled, pad_id=0))
    assert _view(first.result()) == _view(generate(model, greedy, pad_id=0))


def test_update_weights_is_versioned(workers, two_layer_model_dir):
    pool = RolloutPool(workers)
    model = load_model(two_layer_model_dir).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    pool.update_weights(model.state_dict(), version=7)
    out = pool.generate(_requests(1.0))
    assert {v for c in out for v in c.versions} == {7} and pool.version == 7
    assert _view(out) == _view(generate(model, _requests(1.0), pad_id=0))
    pool.update_weights(original, version=8)


def test_engine_is_chosen_by_recipe_key(ray_session, two_layer_model_dir):
    """An `hf` worker (transformers' generate) gives the same records, with teacher-forced fp32 logprobs."""
    with pytest.raises(ValidationError, match="'cispo', 'hf' or 'vllm'"):
        RolloutConfig(engine="sglang")
    assert set(ENGINES) == set(typing.get_args(RolloutConfig.model_fields["engine"].annotation))
    model = load_model(two_layer_model_dir).eval()
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(7,), repetition_tokens=100)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, repetition_tokens=100)
    requests = [Request(PROMPTS[0], params=greedy), Request(PROMPTS[1], n=3, seed=5, params=sampled)]
    pool = RolloutPool.start(1, str(two_layer_model_dir), 0, RolloutConfig(threads=1, engine="hf"))
    try:
        out = pool.generate(requests)
        with pytest.raises(Exception, match="does not support stop_strings"):
            pool.generate([Request(PROMPTS[0], params=SamplingParams(stop_strings=("x",), repetition_tokens=100))])
    finally:
        pool.shutdown()
    assert [c.prompt_ids for c in out] == [PROMPTS[0]] + [PROMPTS[1]] * 3
    ours = generate(model, requests[:1], pad_id=0)[0]
    assert (out[0].response_ids, out[0].finish_reason) == (ours.response_ids, ours.finish_reason)
    for c in out:
        expected = teacher_forced(model, c.prompt_ids, c.response_ids)
        assert (expected - torch.tensor(c.logprobs)).abs().max() < 1e-4
    assert all(len(c.response_ids) == 10 and c.finish_reason == "length" for c in out[1:])


def test_dead_worker_requests_rerun_on_survivor(workers, two_layer_model_dir):
    pool = RolloutPool(workers)
    requests = _requests(1.0)
    expected = RolloutPool(workers[:1]).generate(requests)
    victim = workers[1]

    def die_mid_batch(worker, forwards: int) -> None:
        """Runs in the victim's process: its model body SIGKILLs the process as it starts forward number
        `forwards` + 1, i.e. after one prefill and forwards - 1 decode steps of its share, mid-batch."""
        calls = itertools.count()
        worker.engine.model.model.register_forward_pre_hook(
            lambda module, args: os.kill(os.getpid(), signal.SIGKILL) if next(calls) == forwards else None)

    # Armed before the batch is sent, so the process dies at a known token, not when a timer fires.
    ray.get(victim.__ray_call__.remote(die_mid_batch, 4))
    out = pool.generate(requests)
    # A failure is only counted for a worker that died with a batch in flight, so this proves mid-batch.
    assert pool.failures == 1 and pool.workers == [workers[0]]
    assert _view(out) == _view(expected)
    pool.update_weights(load_model(two_layer_model_dir).state_dict(), version=9)  # a dead worker is skipped
    assert {v for c in pool.generate(requests[:1]) for v in c.versions} == {9}
