"""The controller: one RL step per iteration, in the order of DESIGN §3."""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path

import ray
import torch

from cispo.advantages import group_advantages
from cispo.config import Recipe, RecipeError, dump_recipe
from cispo.data import Prompt, PromptSource
from cispo.metrics import MetricsLog, percentile
from cispo.trainer import Trainer
from rewards.pool import ScoringPool
from rewards.registry import resolve
from rollout.engine import Request, SamplingParams
from rollout.model import build_char_tokenizer, build_hybrid, load_model, load_tokenizer, save_model
from rollout.worker import RolloutWorker


def train(recipe: Recipe) -> dict:
    start = time.perf_counter()
    run_dir = _prepare_run_dir(recipe)
    source = PromptSource(recipe.data, recipe.run.seed)
    reward_fn = resolve(recipe.reward.name)
    tok, model_dir = _initial_model(recipe, run_dir)
    workers, trainers = _start_actors(recipe, model_dir, tok.pad_token_id)
    pool = ScoringPool(recipe.reward.num_workers, recipe.reward.timeout_s)
    log = MetricsLog(run_dir, recipe)
    try:
        if recipe.sft.steps:
            _warm_start(recipe, source, tok, trainers)
            _sync(trainers, workers, version=0)
        acc_start = evaluate(recipe, source.eval, tok, workers, pool, reward_fn)
        print(f"eval accuracy before RL: {acc_start:.3f}", flush=True)
        for step in range(1, recipe.run.max_steps + 1):
            t0 = time.perf_counter()
            prompts = source.batch(step)                                                    # 1. prompts
            completions = _rollout(recipe, prompts, tok, workers, step)                     # 2. rollout
            t1 = time.perf_counter()
            rewards, statuses = _score(pool, reward_fn, prompts, completions, tok)          # 3. rewards
            t2 = time.perf_counter()
            group = torch.tensor([c.request_index for c in completions])
            advantages = group_advantages(rewards, group)                                   # 4. advantages
            batch = _pack(prompts, completions, advantages, group, tok, recipe.rollout.temperature)
            stats = _train(recipe, trainers, batch, step)                                   # 5. train
            t3 = time.perf_counter()
            _sync(trainers, workers, version=step)                                          # 6. sync
            t4 = time.perf_counter()
            lengths = [len(c.token_ids) for c in completions]
            log.log({"step": step, "reward_mean": float(rewards.mean()), **stats,           # 7. record
                     "response_length_mean": statistics.fmean(lengths),
                     "response_length_p99": percentile(lengths, 99),
                     "finish_length_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
                     "reward_errors": sum(s != "ok" for s in statuses),
                     "zero_spread_groups": _zero_spread_groups(rewards, group),
                     "time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2,
                     "time_sync_s": t4 - t3, "time_step_s": t4 - t0})
            if recipe.run.eval_every and step % recipe.run.eval_every == 0 and step != recipe.run.max_steps:
                print(f"eval accuracy at step {step}: "
                      f"{evaluate(recipe, source.eval, tok, workers, pool, reward_fn):.3f}", flush=True)
        acc_end = evaluate(recipe, source.eval, tok, workers, pool, reward_fn)
        ray.get(trainers[0].save_pretrained.remote(str(run_dir / "final")))
        tok.save_pretrained(run_dir / "final")
    finally:
        log.close()
        pool.close()
    summary = {"eval_accuracy_start": acc_start, "eval_accuracy_end": acc_end, "steps": recipe.run.max_steps,
               "wall_s": time.perf_counter() - start, **_time_medians(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: eval accuracy {acc_start:.3f} -> {acc_end:.3f} in {summary['wall_s']:.0f}s "
          f"({recipe.run.max_steps} steps), run dir {run_dir}", flush=True)
    return summary


# ---------------------------------------------------------------- the phases

def _prepare_run_dir(recipe: Recipe) -> Path:
    run_dir = Path(recipe.run.dir)
    if recipe.run.resume:
        raise RecipeError("run.resume=true: resuming from a checkpoint is not built yet (see the README)")
    if (run_dir / "metrics.jsonl").exists():
        raise RecipeError(f"run.dir {run_dir} already holds a run; choose another run.dir or delete it")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, run_dir / "config.yaml")
    return run_dir


def _initial_model(recipe: Recipe, run_dir: Path):
    """Save the starting model and its tokenizer under run_dir/init, where every actor loads it."""
    m, model_dir = recipe.model, run_dir / "init"
    if m.path:
        if not Path(m.path).is_dir():
            raise RecipeError(f"model.path {m.path} is not a directory")
        tok, model = load_tokenizer(m.path), load_model(m.path)
    else:
        tok = build_char_tokenizer(m.alphabet)
        torch.manual_seed(m.seed)
        model = build_hybrid(m.preset, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, **m.overrides)
    save_model(model, tok, model_dir)
    return tok, str(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_actors(recipe: Recipe, model_dir: str, pad_id: int):
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        actors = recipe.rollout.num_workers + recipe.trainer.num_ranks
        ray.init(include_dashboard=False, num_cpus=max(os.cpu_count(), actors), log_to_driver=True)
    threads = recipe.run.threads
    workers = [RolloutWorker.remote(model_dir, pad_id, recipe.rollout.threads or threads)
               for _ in range(recipe.rollout.num_workers)]
    port, ranks = _free_port(), recipe.trainer.num_ranks
    trainers = [Trainer.remote(recipe.model_dump_json(), model_dir, rank, ranks, port) for rank in range(ranks)]
    ray.get([t.__ray_ready__.remote() for t in trainers + workers])
    return workers, trainers


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _warm_start(recipe: Recipe, source: PromptSource, tok, trainers) -> None:
    """Supervised steps on the reference answers, with the same DeepSpeed trainer."""
    s, t0 = recipe.sft, time.perf_counter()
    for step in range(1, s.steps + 1):
        rows = []
        for p in source.batch(step, s.batch_size, stream=1):
            prompt = [tok.bos_token_id] + _tokens(tok, p.text)
            rows.append((prompt, _tokens(tok, p.target) + [tok.eos_token_id]))
        ids, mask = _right_pad(rows, tok.eos_token_id)
        stats = _each_rank(trainers, "sft_step", ids, mask)
        if step % 50 == 0 or step == s.steps:
            print(f"sft {step}/{s.steps} loss {stats[0]['loss']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)


def _right_pad(rows: list[tuple[list[int], list[int]]], filler_id: int):
    """[prompt + response] rows, right-padded (exact for a causal model); mask marks response targets.

    Fill with a real token such as EOS, not the pad id: the pad embedding is all zeros, and zero rows
    gave NaN gradients in layer 0's lightning attention (measured on this model; grads finite otherwise).
    """
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), filler_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1))
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    return ids, mask


def _each_rank(trainers, method: str, *tensors, **kwargs) -> list[dict]:
    """Split rows across ranks (DeepSpeed averages their gradients) and call `method` on each."""
    n = len(trainers)
    parts = [[t.chunk(n)[r] for t in tensors] for r in range(n)]
    return ray.get([getattr(tr, method).remote(*p, **kwargs) for tr, p in zip(trainers, parts)])


def _sampling(recipe: Recipe, tok, temperature: float) -> SamplingParams:
    r = recipe.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                          stop_token_ids=(tok.eos_token_id,), repetition_tokens=r.repetition_tokens,
                          repetition_prob=r.repetition_prob)


def _generate(workers, requests: list[Request]):
    """Spread requests over the workers; completions come back in request order."""
    shares = [list(range(i, len(requests), len(workers))) for i in range(len(workers))]
    outs = ray.get([w.generate.remote([requests[i] for i in share]) for w, share in zip(workers, shares) if share])
    completions = []
    for share, out in zip(shares, outs):
        for c in out:
            c.request_index = share[c.request_index]
            completions.append(c)
    return sorted(completions, key=lambda c: (c.request_index, c.sample_index))


def _rollout(recipe: Recipe, prompts: list[Prompt], tok, workers, step: int):
    params = _sampling(recipe, tok, recipe.rollout.temperature)
    requests = [Request([tok.bos_token_id] + _tokens(tok, p.text), n=recipe.rollout.n_samples,
                        seed=hash((recipe.run.seed, step, i)) % 2**31, params=params) for i, p in enumerate(prompts)]
    return _generate(workers, requests)


def _score(pool: ScoringPool, reward_fn, prompts: list[Prompt], completions, tok):
    texts = tok.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    results = pool.map(reward_fn, [(t, prompts[c.request_index].answer) for t, c in zip(texts, completions)])
    return torch.tensor([r.score for r in results]), [r.status for r in results]


def _pack(prompts, completions, advantages, group, tok, temperature: float) -> dict:
    rows = [([tok.bos_token_id] + _tokens(tok, prompts[c.request_index].text), c.token_ids) for c in completions]
    ids, mask = _right_pad(rows, tok.eos_token_id)
    old = torch.zeros_like(mask)
    for i, ((p, _), c) in enumerate(zip(rows, completions)):
        old[i, len(p) - 1:len(p) - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return {"input_ids": ids, "loss_mask": mask, "old_logprobs": old, "advantages": advantages,
            "group_index": group, "temperature": temperature}


def _train(recipe: Recipe, trainers, batch: dict, step: int) -> dict:
    n = len(trainers)
    shards = [{k: (v.chunk(n)[r] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()} for r in range(n)]
    stats = ray.get([t.train_batch.remote(s, recipe.algorithm.updates_per_batch, recipe.run.seed + step)
                     for t, s in zip(trainers, shards)])
    return {k: statistics.fmean(s[k] for s in stats) for k in stats[0]}


def _sync(trainers, workers, version: int) -> None:
    # The state dict goes trainer -> object store -> workers, never through this process.
    state = trainers[0].state_dict.remote()
    ray.get([w.update_weights.remote(state, version) for w in workers])


def evaluate(recipe: Recipe, prompts: list[Prompt], tok, workers, pool: ScoringPool, reward_fn) -> float:
    """Greedy accuracy on held-out prompts."""
    if not prompts:
        return float("nan")
    params = _sampling(recipe, tok, temperature=0.0)
    requests = [Request([tok.bos_token_id] + _tokens(tok, p.text), n=1, params=params) for p in prompts]
    rewards, _ = _score(pool, reward_fn, prompts, _generate(workers, requests), tok)
    return float(rewards.mean())


def _zero_spread_groups(rewards: torch.Tensor, group: torch.Tensor) -> int:
    return sum(int(rewards[group == g].std() == 0) for g in group.unique())


def _time_medians(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("time_")]
    return {f"median_{k}": statistics.median(r[k] for r in rows) for k in keys}
