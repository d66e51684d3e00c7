"""Partial and asynchronous rollouts (rollout.partial_tokens, rollout.overlap, rollout.max_staleness): paused
responses continue under new weights with each token's version recorded, the schedule depends on steps and
token counts only, the bound is refused at admission, and a resume from the held state loses nothing."""
import os
import pickle
import subprocess
import sys
from contextlib import closing

import pytest
import torch

from cispo.batching import TrainBatch
from cispo.collect import Collector, done
from cispo.config import RecipeError, load_recipe
from cispo.data import PromptSource
from cispo.loop import train
from cispo.metrics import Timer, read_metrics
from cispo.trainer import TrainerGroup
from rewards.pool import ScoringPool
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import load_model, token_logprobs
from tests.cispo.test_checkpoint import _comparable, sigkill_at_checkpoint
from tests.conftest import REPO

RECIPE = REPO / "recipes/tiny-arith.yaml"
BUDGET, CHUNK = 9, 3
PARTIAL = ["data.prompts_per_step=3", "rollout.n_samples=2", f"rollout.max_new_tokens={BUDGET}",
           f"rollout.partial_tokens={CHUNK}", "rollout.max_staleness=2", "reward.num_workers=1"]


def _steps(tiny_model_dir, tok, steps, paused=None):
    """Run partial-rollout steps on an in-process engine whose weight version is step - 1 (as the loop
    publishes); returns ({step: [groups admitted, (prompt, admitted, response_ids, versions) of each finished
    sample...]}, the paused groups after, pickled as a checkpoint holds them)."""
    recipe = load_recipe(RECIPE, PARTIAL)
    engine = CispoEngine(load_model(tiny_model_dir), RolloutConfig(), tok.pad_token_id, tok)
    source = PromptSource(recipe.data, recipe.run.seed)
    seen = {}
    with ScoringPool(1, 10.0) as scorer, closing(Collector(recipe, tok, engine, scorer)) as collector:
        collector.paused = pickle.loads(paused) if paused else []
        for step in steps:
            engine.version = step - 1
            admitted = {id(g.prompt): g.admitted for g in collector.paused}
            first, _, counts = collector.submit(step, source, BUDGET, Timer()).result()
            seen[step] = [counts["partial_admitted_groups"]] + [(g.prompt.text, admitted.get(id(g.prompt), step), t.response_ids, t.versions)
                          for g in first for t in g.trajectories]
            assert counts["partial_finished_groups"] == len(first)
            assert counts["partial_paused_groups"] == len(collector.paused)
            assert counts["partial_admitted_groups"] == 3  # prompts_per_step fresh groups each step
        return seen, pickle.dumps(collector.paused)


def test_paused_responses_continue_under_new_weights_with_their_versions(tiny_model_dir, tiny_tokenizer):
    seen, paused = _steps(tiny_model_dir, tiny_tokenizer, [1, 2, 3, 4])
    finished = [row for step in seen for row in seen[step][1:]]
    assert any(len(ids) > CHUNK for _, _, ids, _ in finished)  # some responses were paused and continued
    for step, rows in seen.items():
        for text, admitted, ids, versions in rows[1:]:
            # chunk c of a response was decoded at step admitted + c, by the weights of version admitted + c - 1
            assert versions == [admitted - 1 + i // CHUNK for i in range(len(ids))]
            assert step - admitted <= (BUDGET - 1) // CHUNK  # trained at most max_staleness versions old
    for g in pickle.loads(paused):  # what is still in flight: at least one sample unfinished, none over budget
        assert not all(done(t, BUDGET) for t in g.trajectories)
        assert all(len(t.response_ids) % CHUNK == 0 or done(t, BUDGET) for t in g.trajectories)


def test_a_resumed_responses_logprobs_are_the_ones_a_single_pass_gives(tiny_model_dir, tiny_tokenizer):
    """The IS weight of a token sampled after a pause divides by its rollout logprob: with the weights held
    fixed across steps, a response decoded in chunks (re-prefilled at each resume) must carry the logprobs
    one forward pass over prompt + response gives, token for token."""
    recipe = load_recipe(RECIPE, PARTIAL)
    model = load_model(tiny_model_dir)
    engine = CispoEngine(load_model(tiny_model_dir), RolloutConfig(), tiny_tokenizer.pad_token_id, tiny_tokenizer)
    source = PromptSource(recipe.data, recipe.run.seed)
    with ScoringPool(1, 10.0) as scorer, closing(Collector(recipe, tiny_tokenizer, engine, scorer)) as collector:
        finished = [t for step in (1, 2, 3, 4) for g in collector.submit(step, source, BUDGET, Timer()).result()[0]
                    for t in g.trajectories]
    resumed = [t for t in finished if len(t.response_ids) > CHUNK]
    assert resumed  # some responses were paused and continued
    with torch.no_grad():
        for t in resumed:
            ids = torch.tensor([t.prompt_ids + t.response_ids])
            hidden = model.model(input_ids=ids).last_hidden_state[:, len(t.prompt_ids) - 1:-1]
            whole, _ = token_logprobs(hidden, model.lm_head.weight, ids[:, len(t.prompt_ids):])
            assert whole[0].tolist() == pytest.approx(t.logprobs, abs=1e-5)


def test_the_schedule_depends_on_steps_and_tokens_and_a_resume_loses_nothing(tiny_model_dir, tiny_tokenizer):
    whole, _ = _steps(tiny_model_dir, tiny_tokenizer, [1, 2, 3, 4, 5])
    again, _ = _steps(tiny_model_dir, tiny_tokenizer, [1, 2, 3, 4, 5])
    assert again == whole
    before, held = _steps(tiny_model_dir, tiny_tokenizer, [1, 2])
    after, _ = _steps(tiny_model_dir, tiny_tokenizer, [3, 4, 5], paused=held)  # a fresh collector, from the held state
    assert {**before, **after} == whole
    # Each group admitted at steps 1-3 has finished by step 5 (it needs 3 chunks at most), exactly once.
    groups = [(text, admitted) for step in whole for text, admitted, _, _ in whole[step][1::2]]  # n = 2 rows each
    assert len(groups) == len(set(groups))
    assert sum(a <= 3 for _, a in groups) == sum(whole[step][0] for step in (1, 2, 3))


def test_the_learning_rate_follows_the_step_not_the_updates_done(ray_session, tiny_model_dir):
    """An asynchronous partial run trains nothing at step 1 and, with dynamic sampling not refilling, fewer
    groups than updates_per_batch at others: the schedule must still be where the step is. Warm-up 4 of 10
    updates (5 steps of 2), then cosine to 0: step 4's first update is position 6, lr 1e-3·(1 + cos(π/3))/2
    = 7.5e-4; step 5's second is position 9, 1e-3·(1 + cos(5π/6))/2 = 6.7e-5. Counting updates done
    instead (the bug this catches) gives positions 0 and 2: 2.5e-4 and 7.5e-4."""
    recipe = load_recipe(RECIPE, ["optim.lr=1e-3", "optim.warmup_steps=4", "optim.schedule=cosine", "run.threads=1",
                                  "run.max_steps=5", "algorithm.updates_per_batch=2"])
    ids = torch.randint(4, 12, (4, 8))
    mask = torch.zeros(4, 7)
    mask[:, 3:] = 1

    def batch(groups: int) -> TrainBatch:  # `groups` prompt groups of 2 responses
        rows = 2 * groups
        return TrainBatch(ids[:rows], mask[:rows], torch.full((rows,), 8), -mask[:rows], torch.tensor([1.0, -1.0] * groups),
                          torch.arange(groups).repeat_interleave(2), torch.zeros(rows, 7, dtype=torch.long))

    trainers = TrainerGroup.start(recipe, str(tiny_model_dir))
    try:
        lone = trainers.train(batch(1), step=4)  # one group: one update, at the step's first position
        both = trainers.train(batch(2), step=5)  # two updates, positions 8 and 9
    finally:
        trainers.shutdown()
    assert lone["updates"] == 1 and lone["lr"] == pytest.approx(recipe.optim.lr_at(6, 10)) == pytest.approx(7.5e-4)
    assert both["updates"] == 2 and both["lr"] == pytest.approx(recipe.optim.lr_at(9, 10)) == pytest.approx(6.699e-5, rel=1e-3)


@pytest.mark.parametrize("override, why", [
    (["rollout.partial_tokens=3", "rollout.max_new_tokens=12"], "may train 3 versions old"),
    (["rollout.overlap=true"], "may train 1 versions old"),
    (["rollout.partial_tokens=4", "rollout.max_staleness=9", "rollout.function=tests.cispo.user_rollouts:with_tool_output"],
     "needs the default rollout.function"),
])
def test_a_bound_no_response_can_meet_is_refused_in_one_line(override, why):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, override)
    assert why in str(err.value) and "\n" not in str(err.value)
    load_recipe(RECIPE, ["rollout.partial_tokens=3", "rollout.max_new_tokens=12", "rollout.overlap=true",
                         "rollout.max_staleness=4"])  # ceil(12/3) - 1 + 1 = 4 versions: admitted


ASYNC = ["recipes/tiny-countdown.yaml", "data.eval_size=10", "data.prompts_per_step=4", "rollout.n_samples=4",
         "sft.steps=0", "run.save_every=1", "run.threads=1", "wandb.mode=disabled", "run.eval_every=0",
         "reward.name=tests.cispo.user_rewards:plus_signs", "algorithm.dynamic_sampling=false",
         "rollout.max_new_tokens=8", "rollout.partial_tokens=3", "rollout.overlap=true", "rollout.max_staleness=3",
         f"data.path={REPO}/data/countdown/train.jsonl", f"data.eval_path={REPO}/data/countdown/eval.jsonl"]


def _cli(run_dir, *extra, ray_address):
    return subprocess.Popen([sys.executable, "-m", "cispo.cli", "train", *ASYNC, f"run.dir={run_dir}", *extra],
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train(run_dir, *extra):
    """The same run as `_cli`'s, in this process: no interpreter start and imports of its own."""
    recipe, *overrides = ASYNC
    return train(load_recipe(REPO / recipe, [*overrides, f"run.dir={run_dir}", *extra]))


@pytest.mark.slow  # three short runs of tiny-countdown from its random model, a minute or more on 2 shared cores
def test_async_partial_runs_repeat_and_resume_after_sigkill_to_the_same_rows(ray_session, tmp_path, capsys):
    _train(tmp_path / "whole", "run.max_steps=4")
    whole = [_comparable(r) for r in read_metrics(tmp_path / "whole")]
    # Tokens one version stale (overlap) and two (a response paused once, under overlap) were trained.
    assert all(any(r.get(f"staleness_{k}") for r in whole) for k in (1, 2))
    assert any(r.get("partial_paused_groups") for r in whole)

    # The killed run's steps 1-2 repeat the whole run's from scratch (same seed, same rows, whatever the load did
    # to the timing: this once took a fourth run of its own) and its resumed steps 3-4 continue from the held state.
    # Only the killed run needs a process of its own (SIGKILL); the other two run here, on the same Ray.
    address = ray_session.get_runtime_context().gcs_address
    sigkill_at_checkpoint(_cli(tmp_path / "killed", "run.max_steps=4", ray_address=address), tmp_path / "killed",
                          step=2, timeout_s=900)
    capsys.readouterr()
    _train(tmp_path / "killed", "run.max_steps=4", "run.resume=true")
    assert "resumed from" in capsys.readouterr().out
    got = [_comparable(r) for r in read_metrics(tmp_path / "killed")]
    assert [r["step"] for r in got] == [1, 2, 3, 4] and got == whole
