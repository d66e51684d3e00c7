"""The controller: one RL step per iteration, in the order of DESIGN §3."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from cispo import checkpoint
from cispo.advantages import advantages
from cispo.batching import minibatches, pad_rows, shard
from cispo.config import Recipe, RecipeError, dump_recipe
from cispo.data import Prompt, PromptSource
from cispo.metrics import MetricsLog, percentile, read_metrics
from cispo.trainer import start_trainers
from rewards.pool import ScoringPool
from cispo.sampling import dynamic_sample, overlong
from cispo.stages import advance
from rewards.registry import build as build_reward
from rewards.sandbox import isolation as sandbox_isolation
from rollout.engine import Completion, Request, SamplingParams
from rollout.model import load_tokenizer, save_model, starting_model
from rollout.worker import RolloutPool


def train(recipe: Recipe) -> dict:
    start = time.perf_counter()
    run_dir, resume_from = _prepare_run_dir(recipe)
    source = PromptSource(recipe.data, recipe.run.seed)
    reward_fns = {name: build_reward(recipe.reward, name) for name in source.pools}
    tok, model_dir = _initial_model(recipe, run_dir, fresh=resume_from is None)
    rollout, trainers = _start_actors(recipe, model_dir, tok.pad_token_id)
    scorer = ScoringPool(recipe.reward.num_workers, recipe.reward.timeout_s)
    log = MetricsLog(run_dir, recipe, sandbox=sandbox_isolation() if recipe.reward.name == "code" else None)
    stop = StopRequest()
    try:
        score = lambda: evaluate(recipe, source.eval, tok, rollout, scorer, reward_fns)
        if resume_from:
            acc_start, first_step = _resume(resume_from, trainers, rollout, log)
        else:
            if recipe.sft.steps:
                _warm_start(recipe, source, tok, trainers, rollout, score, stop)
            if stop.requested:  # no RL step ran, so there is nothing to checkpoint yet
                print(f"stopped by {stop.requested} during the warm start; nothing to resume", flush=True)
                return {"interrupted": stop.requested, "steps": 0}
            acc_start, first_step = score(), 1
        print(f"eval accuracy before RL: {acc_start:.3f}", flush=True)
        rows = read_metrics(run_dir) if resume_from else []
        for step in range(first_step, recipe.run.max_steps + 1):
            timer = Timer()
            window, reason = advance(rows, recipe.stages) if recipe.stages.windows else (recipe.rollout.max_new_tokens, None)
            if reason:
                print(f"stage: window -> {window} tokens ({reason})", flush=True)
            draw = lambda k, i: _collect(recipe, source.batch(step, k, stream=f"rl{i}"), tok, rollout, scorer, reward_fns,
                                         (step, i), timer, window)
            first = draw(recipe.data.prompts_per_step, 0)                                   # 1-3. prompts, rollout, rewards
            groups, sampling = _dynamic_sampling(recipe, first, draw)                       # refill zero-spread groups
            stats = {}
            if groups:
                batch = _batch(recipe, groups, tok, window)                                 # 4. advantages
                with timer("train"):
                    stats = _train(recipe, trainers, batch, step)                           # 5. train
                with timer("sync"):
                    _sync(trainers, rollout, version=step)                                  # 6. sync
            rows.append({"step": step, "window": window, "stage_reason": reason, **_rollout_metrics(first),  # 7. record
                         **sampling, **stats, "rollout_worker_failures": rollout.failures, **timer.seconds()})
            log.log(rows[-1])
            if step % recipe.run.save_every == 0 or step == recipe.run.max_steps or stop.requested:
                _save(recipe, run_dir, trainers, step, acc_start)
            if stop.requested:
                print(f"stopped by {stop.requested} after step {step}; resume with run.resume=true", flush=True)
                return {"interrupted": stop.requested, "steps": step}
            if recipe.run.eval_every and step % recipe.run.eval_every == 0 and step != recipe.run.max_steps:
                print(f"eval accuracy at step {step}: {score():.3f}", flush=True)
        acc_end = score()
        ray.get([t.save_pretrained.remote(str(run_dir / "final")) for t in trainers])
        tok.save_pretrained(run_dir / "final")
    finally:
        stop.restore()
        log.close()
        scorer.close()
        rollout.shutdown()
        trainers.shutdown()
    summary = {"eval_accuracy_start": acc_start, "eval_accuracy_end": acc_end, "steps": recipe.run.max_steps,
               "wall_s": time.perf_counter() - start, **_time_medians(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: eval accuracy {acc_start:.3f} -> {acc_end:.3f} in {summary['wall_s']:.0f}s "
          f"({recipe.run.max_steps} steps), run dir {run_dir}", flush=True)
    return summary


# ---------------------------------------------------------------- the phases

def _prepare_run_dir(recipe: Recipe) -> tuple[Path, Path | None]:
    """The run dir and, with run.resume, the newest complete checkpoint to continue from."""
    run_dir = Path(recipe.run.dir)
    found = checkpoint.latest(run_dir) if recipe.run.resume else None
    if recipe.run.resume and found is None:
        raise RecipeError(f"run.resume=true but {run_dir} holds no complete checkpoint")
    if not recipe.run.resume and (run_dir / "metrics.jsonl").exists():
        raise RecipeError(f"run.dir {run_dir} already holds a run; resume it with run.resume=true, or choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, run_dir / "config.yaml")
    return run_dir, found[0] if found else None


def _initial_model(recipe: Recipe, run_dir: Path, fresh: bool):
    """Save the starting model and its tokenizer under run_dir/init, where every actor loads it."""
    m, model_dir = recipe.model, run_dir / "init"
    if not fresh:  # resuming: the checkpoint holds the weights, init/ holds the architecture and tokenizer
        return load_tokenizer(model_dir), str(model_dir)
    try:
        model, tok = starting_model(m)
    except FileNotFoundError as exc:
        raise RecipeError(str(exc)) from None
    save_model(model, tok, model_dir)
    return tok, str(model_dir)


def _save(recipe: Recipe, run_dir: Path, trainers, step: int, acc_start: float) -> None:
    staging = checkpoint.staging_dir(run_dir, step)
    ray.get([t.save_checkpoint.remote(str(staging)) for t in trainers])
    checkpoint.commit(staging, {"step": step, "eval_accuracy_start": acc_start}, recipe.run.keep_last)


def _resume(path: Path, trainers, rollout: RolloutPool, log: MetricsLog) -> tuple[float, int]:
    """Restore every rank, republish the weights, drop metrics rows logged after the checkpoint."""
    state = json.loads((path / checkpoint.MARKER).read_text())
    ray.get([t.load_checkpoint.remote(str(path)) for t in trainers])
    _sync(trainers, rollout, version=state["step"])
    log.truncate(state["step"])
    print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["eval_accuracy_start"], state["step"] + 1


class StopRequest:
    """SIGTERM/SIGINT end the run after the current step, with a checkpoint, instead of losing it."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"{self.requested}: finishing step, then saving a checkpoint", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _start_actors(recipe: Recipe, model_dir: str, pad_id: int):
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if os.environ.get("RAY_ADDRESS"):  # join a running cluster (launch/ray-cluster.sh, tests)
            ray.init()
        else:
            actors = recipe.rollout.num_workers + recipe.trainer.num_ranks
            ray.init(include_dashboard=False, num_cpus=max(os.cpu_count(), actors), log_to_driver=True)
    r = recipe.rollout
    rollout = RolloutPool.start(r.num_workers, model_dir, pad_id,
                                r.model_copy(update={"threads": r.threads or recipe.run.threads}),
                                options=recipe.resources.rollout.ray_options())
    trainers = start_trainers(recipe, model_dir)
    nodes = ray.get([a.node.remote() for a in rollout.workers + trainers])
    print(f"placement: rollout workers on nodes {sorted(set(nodes[:len(rollout.workers)]))}, "
          f"trainer ranks on nodes {sorted(set(nodes[len(rollout.workers):]))}", flush=True)
    return rollout, trainers


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _warm_start(recipe: Recipe, source: PromptSource, tok, trainers, rollout: RolloutPool, score, stop: StopRequest) -> None:
    """Supervised steps on the reference answers, with the same DeepSpeed trainer.

    With `sft.stop_at_accuracy`, it ends once the greedy eval accuracy reaches the target: when a
    small model's accuracy jumps depends on thread count and numerics, the target does not.
    """
    s, t0 = recipe.sft, time.perf_counter()
    for step in range(1, s.steps + 1):
        if stop.requested:
            return
        rows = []
        for p in source.batch(step, s.batch_size, stream="sft"):
            prompt = [tok.bos_token_id] + _tokens(tok, p.text)
            rows.append((prompt, _tokens(tok, p.target) + [tok.eos_token_id]))
        plan, _ = shard(pad_rows(rows, tok.eos_token_id), torch.arange(len(rows)), "token", len(trainers), recipe.trainer)
        loss = sum(out["loss"] for out in ray.get([t.sft_step.remote(p) for t, p in zip(trainers, plan)]))
        if step % s.eval_every == 0 or step == s.steps:
            _sync(trainers, rollout, version=0)
            accuracy = score() if s.stop_at_accuracy else float("nan")
            print(f"sft {step}/{s.steps} loss {loss:.4f} eval accuracy {accuracy:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if s.stop_at_accuracy and accuracy >= s.stop_at_accuracy:
                break


def _sampling(recipe: Recipe, tok, temperature: float, max_new_tokens: int | None = None) -> SamplingParams:
    r = recipe.rollout
    return SamplingParams(max_new_tokens=max_new_tokens or r.max_new_tokens, temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                          stop_token_ids=(tok.eos_token_id,), stop_strings=tuple(r.stop_strings), repetition_tokens=r.repetition_tokens,
                          repetition_prob=r.repetition_prob)


@dataclass
class Group:
    """One prompt's G responses and their rewards."""
    prompt: Prompt
    completions: list[Completion]
    rewards: torch.Tensor
    statuses: list[str]


class Timer:
    """Seconds per phase within one step; repeated phases (refill draws) add up."""

    def __init__(self):
        self.start, self.spent = time.perf_counter(), {"rollout": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.spent[phase] += time.perf_counter() - t0

    def seconds(self) -> dict:
        return {**{f"time_{k}_s": v for k, v in self.spent.items()}, "time_step_s": time.perf_counter() - self.start}


def _collect(recipe: Recipe, prompts: list[Prompt], tok, rollout: RolloutPool, scorer: ScoringPool, reward_fns, key: tuple, timer: Timer,
             window: int):
    """Generate n responses per prompt within the stage's window and score them; `key` seeds the
    requests, so a resumed run draws exactly what the original would have."""
    params = _sampling(recipe, tok, recipe.rollout.temperature, window)
    requests = [Request([tok.bos_token_id] + _tokens(tok, p.text), n=recipe.rollout.n_samples,
                        seed=hash((recipe.run.seed, *key, i)) % 2**31, params=params) for i, p in enumerate(prompts)]
    with timer("rollout"):
        completions = rollout.generate(requests)
    with timer("reward"):
        rewards, statuses = _score(scorer, reward_fns, prompts, completions, tok)
    n = recipe.rollout.n_samples
    return [Group(p, completions[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n], statuses[i * n:(i + 1) * n])
            for i, p in enumerate(prompts)]


def _dynamic_sampling(recipe: Recipe, groups: list[Group], draw) -> tuple[list[Group], dict]:
    """DAPO's dynamic sampling (M1 uses it): groups whose rewards all agree carry no signal."""
    a = recipe.algorithm
    if not a.dynamic_sampling:
        return groups, {}
    draws = iter(range(1, a.max_refill_draws + 1))
    kept, counts = dynamic_sample(groups, lambda k: draw(k, next(draws)), rewards=lambda g: g.rewards,
                                  target=len(groups), max_draws=a.max_refill_draws)
    return kept, {**counts, "trained_groups": len(kept)}


def _score(scorer: ScoringPool, reward_fns: dict, prompts: list[Prompt], completions, tok):
    """Each completion scored by its data source's reward, in the scoring processes."""
    texts = tok.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    results = [None] * len(completions)
    for name, fn in reward_fns.items():
        rows = [i for i, c in enumerate(completions) if prompts[c.request_index].source == name]
        for i, r in zip(rows, scorer.map(fn, [(texts[i], prompts[completions[i].request_index].answer) for i in rows])):
            results[i] = r
    return torch.tensor([r.score for r in results]), [r.status for r in results]


def _batch(recipe: Recipe, groups: list[Group], tok, window: int) -> dict:
    """Advantages (Eq. 2 or the recipe's estimator) and the padded training rows of the kept groups."""
    a, r = recipe.algorithm, recipe.rollout
    completions = [c for g in groups for c in g.completions]
    rewards, keep = overlong(torch.cat([g.rewards for g in groups]), [c.finish_reason for c in completions],
                             [len(c.token_ids) for c in completions], mode=a.overlong, budget=window,
                             buffer=a.overlong_buffer, penalty=a.overlong_penalty)
    # A sandbox failure is the harness's fault, not the response's: train on neither outcome.
    keep &= torch.tensor([s != "sandbox_error" for g in groups for s in g.statuses])
    group_index = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g.completions) for g in groups]))
    rows = [([tok.bos_token_id] + _tokens(tok, g.prompt.text), c.token_ids) for g in groups for c in g.completions]
    batch = pad_rows(rows, tok.eos_token_id)
    batch["loss_mask"] *= keep.unsqueeze(1)
    old = batch["old_logprobs"] = torch.zeros_like(batch["loss_mask"])
    for i, ((p, _), c) in enumerate(zip(rows, completions)):
        old[i, len(p) - 1:len(p) - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return {**batch, "group_index": group_index, "advantages": advantages(rewards, group_index, a.advantage)}


def _rollout_metrics(groups: list[Group]) -> dict:
    """What the first draw of the step looked like (before dynamic sampling chose groups)."""
    completions = [c for g in groups for c in g.completions]
    lengths = [len(c.token_ids) for c in completions]
    statuses = [s for g in groups for s in g.statuses]
    return {"reward_mean": float(torch.cat([g.rewards for g in groups]).mean()),
            "response_length_mean": statistics.fmean(lengths), "response_length_p99": percentile(lengths, 99),
            "finish_length_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "finish_repetition_fraction": sum(c.finish_reason == "repetition" for c in completions) / len(completions),
            "zero_spread_groups": sum(int(g.rewards.max() == g.rewards.min()) for g in groups),
            # exp(−mean token logprob) of what was generated: the 80k stage rule waits for it to settle.
            "response_perplexity": math.exp(-sum(sum(c.logprobs) for c in completions)
                                            / max(1, sum(len(c.logprobs) for c in completions))),
            **{f"reward_{k}": statuses.count(k) for k in ("error", "timeout", "sandbox_error")}}


def _train(recipe: Recipe, trainers, batch: dict, step: int) -> dict:
    """K off-policy updates, each a minibatch of whole groups split over ranks and micro-batches."""
    a, counts, plans = recipe.algorithm, Counter(), []
    for rows in minibatches(batch["group_index"], a.updates_per_batch, recipe.run.seed + step):
        plan, tokens = shard(batch, rows, a.normalization, len(trainers), recipe.trainer)
        plans.append(plan)
        counts.update(tokens)
    stats = ray.get([t.train_batch.remote([p[r] for p in plans], recipe.rollout.temperature)
                     for r, t in enumerate(trainers)])
    # Ranks' losses are shares of one sum; the same on every rank: grad norm, skips, lr; the rest are
    # token means (absent on a rank whose responses were all masked).
    out = {"loss": sum(s.pop("loss") for s in stats), **{k: stats[0].pop(k) for k in ("grad_norm", "skipped_steps", "lr")}}
    tokens = [s.pop("tokens") for s in stats]
    if any("is_weight_max" in s for s in stats):
        out["is_weight_max"] = max(s.pop("is_weight_max") for s in stats if "is_weight_max" in s)
    for k in dict.fromkeys(k for s in stats for k in s if k not in out):  # in a stable order
        out[k] = sum(s.get(k, 0.0) * n for s, n in zip(stats, tokens)) / max(sum(tokens), 1)
    return {**out, "updates": len(plans), "padding_fraction": 1 - counts["real_tokens"] / counts["padded_tokens"]}


def _sync(trainers, rollout: RolloutPool, version: int) -> None:
    # The state dict goes trainer -> object store -> workers, never through this process. Every
    # rank takes part (ZeRO-3 gathers); rank 0's copy is the one published.
    rollout.update_weights([t.state_dict.remote() for t in trainers][0], version)


def evaluate(recipe: Recipe, prompts: list[Prompt], tok, rollout: RolloutPool, scorer: ScoringPool, reward_fns: dict) -> float:
    """Greedy accuracy on held-out prompts, at the full budget."""
    if not prompts:
        return float("nan")
    params = _sampling(recipe, tok, temperature=0.0)
    requests = [Request([tok.bos_token_id] + _tokens(tok, p.text), n=1, params=params) for p in prompts]
    rewards, _ = _score(scorer, reward_fns, prompts, rollout.generate(requests), tok)
    return float(rewards.mean())


def _time_medians(run_dir: Path) -> dict:
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []  # none with run.max_steps=0
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("time_")]
    return {f"median_{k}": statistics.median(r[k] for r in rows) for k in keys}
