"""The one collection path: prompts -> the recipe's rollout function -> trajectories -> scored groups.

Training (with dynamic sampling's refill), `cispo eval` and `cispo filter` all collect through a
`Collector`, so they cannot disagree on how a prompt becomes token ids, how requests are seeded, which
sampling parameters apply, which rollout function runs (`rollout.function`), or which reward scores
which data source.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace

import torch

from cispo.config import Recipe, RecipeError
from cispo.data import Prompt, PromptSource, derive_seed
from cispo.metrics import Timer, percentile
from cispo.sampling import dynamic_sample, has_spread
from rewards.pool import ScoringPool
from rewards.types import RewardInput
from rollout.model import load_tokenizer
from rollout.trajectory import Request, RolloutInput, SamplingParams, Trajectory
from rollout.worker import RolloutPool


def encode_prompt(tok, text: str, chat_template: bool = False, messages: tuple = ()) -> list[int]:
    """A prompt's token ids, exactly as a user of the exported model gets them: `tok(text)` (the
    tokenizer adds its own special tokens, e.g. BOS), or with `chat_template` the tokenizer's chat
    template around one user turn, ending with the generation prompt. A prompt the data gives as chat
    `messages` (verl's) always goes through the chat template, as verl encodes it."""
    if not chat_template and not messages:
        return tok(text)["input_ids"]
    if not tok.chat_template:
        raise RecipeError("the data's prompts are chat messages but the tokenizer has no chat template" if messages
                          else "model.chat_template=true but the tokenizer has no chat template")
    messages = list(messages) or [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


@dataclass
class Group:
    """One prompt's G scored trajectories (each with its reward and status)."""
    prompt: Prompt
    trajectories: list[Trajectory]

    @property
    def rewards(self) -> torch.Tensor:
        """[G] float32, the trajectories' rewards."""
        return torch.tensor([t.reward for t in self.trajectories], dtype=torch.float32)

    @property
    def valid(self) -> torch.Tensor:
        """[G] bool: the responses whose reward judged them. A sandbox or environment failure (sandbox_error,
        env_error) is the harness's fault, not the response's: it is left out of the group's baseline and spread (cispo.advantages), so dynamic
        sampling sees what the real outcomes say, and gets no loss (verl PR #6375). A reward error or
        timeout still scores 0: a response can cause either (a program that runs too long, text the
        reward chokes on)."""
        return torch.tensor([t.status not in ("sandbox_error", "env_error") for t in self.trajectories],
                            dtype=torch.bool)


def passed(group: Group) -> list[bool]:
    """Pass or fail for each response whose reward could be computed (status ok); a pass is a full score:
    every test for code, a correct answer for math. A response that errored or timed out is neither."""
    return [t.reward >= 1.0 for t in group.trajectories if t.status == "ok"]


def rollout_metrics(groups: list[Group]) -> dict:
    """What one draw of scored groups looked like, before dynamic sampling chose; empty for no groups
    (a partial-rollout step in which no group finished)."""
    if not groups:
        return {}
    trajectories = [t for g in groups for t in g.trajectories]
    lengths = [len(t.response_ids) for t in trajectories]
    statuses = [t.status for t in trajectories]
    trained = [[lp for lp, m in zip(t.logprobs, t.loss_mask) if m] for t in trajectories]
    return {"reward_mean": float(torch.cat([g.rewards for g in groups]).mean()),
            "response_length_mean": statistics.fmean(lengths), "response_length_p99": percentile(lengths, 99),
            "finish_length_fraction": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
            "finish_repetition_fraction": sum(t.finish_reason == "repetition" for t in trajectories) / len(trajectories),
            "zero_spread_groups": sum(not has_spread(g.rewards[g.valid]) for g in groups),
            # Which prompts, in order: two runs' rows show a prompt skipped or seen twice (e.g. across a resume).
            "prompts_digest": hashlib.blake2b("\0".join(g.prompt.text for g in groups).encode(), digest_size=8).hexdigest(),
            # exp(−mean token logprob) of the tokens that train: the 80k stage rule waits for it to settle.
            "response_perplexity": math.exp(-sum(map(sum, trained)) / max(1, sum(map(len, trained)))),
            **{f"reward_{k}": statuses.count(k) for k in ("error", "timeout", "sandbox_error")},
            **{f"episode_{k}": sum(t.outcomes.get(k, 0) for t in trajectories)
               for k in dict.fromkeys(k for t in trajectories for k in t.outcomes)}}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, Eq. 1): 1 − C(n−c, k)/C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class PendingStep:
    """One RL step's collection, running on the collector's background thread. `result()` waits for it
    and returns (the first draw's groups, the groups to train on, the dynamic-sampling counts), or
    raises what the collection raised. `window` and `reason` are the step's budget and why its stage moved
    on; `timer` times its phases."""
    future: Future
    window: int
    reason: str | None
    timer: Timer

    def result(self) -> tuple[list[Group], list[Group], dict]:
        return self.future.result()


@dataclass
class Paused:
    """A group in flight across steps (partial rollouts): its prompt, the seed of its first request, the
    step that admitted it, and its n trajectories so far (empty before its first chunk); each finished
    (`done`) or paused with its tokens, logprobs and versions."""
    prompt: Prompt
    seed: int
    admitted: int
    trajectories: list[Trajectory]


def done(t: Trajectory, budget: int) -> bool:
    """Whether a sample is finished: it stopped, or reached the budget."""
    return t.finish_reason != "length" or len(t.response_ids) >= budget


class Collector:
    """Generates and scores responses for a recipe: `rollout` is the engine handle the recipe's rollout
    function calls (cispo's RolloutPool: `generate(requests)`), `scorer` a ScoringPool; the reward of
    each data source comes from the recipe. `close()` ends the background thread of `submit`."""

    def __init__(self, recipe: Recipe, tok, rollout, scorer: ScoringPool):
        self.recipe, self.tok, self.rollout, self.scorer = recipe, tok, rollout, scorer
        self.rewards = recipe.rewards()  # RecipeError naming the key for a reward that cannot load
        self.rollout_function = recipe.rollout_function()  # likewise for rollout.function
        if isinstance(self.rollout_function, type):  # a class: built once, with what it needs to know
            self.rollout_function = self.rollout_function(recipe, tok)
        self.unscored = 0  # responses pass_rates could not score (reward error, timeout, sandbox error)
        self.paused: list[Paused] = []  # partial rollouts: groups not finished at the last step, in admission order
        # One thread: submitted steps collect in order, each while the caller does something else.
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")

    def sampling(self, temperature: float | None = None, max_new_tokens: int | None = None) -> SamplingParams:
        """The recipe's sampling parameters, at another temperature (0: greedy) or budget if given."""
        r = self.recipe.rollout
        return SamplingParams(max_new_tokens=max_new_tokens or r.max_new_tokens,
                              temperature=r.temperature if temperature is None else temperature,
                              top_p=r.top_p, top_k=r.top_k, stop_token_ids=(self.tok.eos_token_id,),
                              stop_strings=tuple(r.stop_strings), repetition_tokens=r.repetition_tokens,
                              repetition_prob=r.repetition_prob)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tok, prompt.text, self.recipe.model.chat_template, prompt.messages)

    def collect(self, prompts: list[Prompt], seeds: list[int], params: SamplingParams, n: int,
                timer: Timer | None = None) -> list[Group]:
        """n trajectories per prompt from the recipe's rollout function, each prompt's random streams
        seeded by its entry in `seeds`, scored by its source's reward. ValueError, one line naming the
        function, when it returns other than one list of n trajectories per prompt."""
        timer = timer or Timer()
        inputs = [RolloutInput(p.text, self.encode(p), params, seed, n, p.answer, p.source, p.fields)
                  for p, seed in zip(prompts, seeds)]
        with timer("rollout"):
            out = self.rollout_function(inputs, self.rollout)
        name = self.recipe.rollout.function
        if len(out) != len(inputs) or any(len(ts) != n for ts in out):
            raise ValueError(f"rollout function {name!r} returned {[len(ts) for ts in out]} trajectories for "
                             f"{len(inputs)} prompts of {n} samples each")
        for t in (t for ts in out for t in ts):
            if not len(t.response_ids) == len(t.logprobs) == len(t.loss_mask) == len(t.versions):
                raise ValueError(f"rollout function {name!r}: a trajectory's response_ids, logprobs, loss_mask "
                                 f"and versions differ in length")
        with timer("reward"):
            self._score(prompts, out)
        return [Group(p, ts) for p, ts in zip(prompts, out)]

    def _score(self, prompts: list[Prompt], out: list[list[Trajectory]]) -> None:
        """Set each trajectory's reward and status, as its prompt's source's reward scores its response;
        one the rollout function already rewarded (status set) keeps its own."""
        rows = [(p, t) for p, ts in zip(prompts, out) for t in ts if t.status is None]
        texts = self.tok.batch_decode([t.response_ids for _, t in rows], skip_special_tokens=True)
        for name in dict.fromkeys(p.source for p, _ in rows):
            if name not in self.rewards:  # a row's own source (a mapped source column, verl's data_source)
                self.rewards[name] = self.recipe.source_reward(name)
            reward = self.rewards[name]
            mine = [i for i, (p, _) in enumerate(rows) if p.source == name]
            inputs = [RewardInput(p.text, texts[i], p.answer, p.source, tuple(t.response_ids), p.fields)
                      for i in mine for p, t in [rows[i]]]
            for i, result in zip(mine, self.scorer.map(reward, inputs)):
                rows[i][1].reward, rows[i][1].status = result.score, result.status

    def submit(self, step: int, source: PromptSource, max_new_tokens: int, timer: Timer,
               reason: str | None = None) -> PendingStep:
        """Start collecting RL step `step`'s groups on the background thread and return at once.

        With dynamic sampling (DAPO, M1) groups whose rewards all agree carry no signal; they are
        dropped and refilled with fresh prompts (draw i of the step is stream `rl{i}`), all before the
        pending step's result is ready. Requests are seeded from (run seed, step, draw, index), so a
        resumed run draws what the original would have.
        """
        collect = self._partial_step if self.recipe.rollout.partial_tokens else self._step
        return PendingStep(self.background.submit(collect, step, source, max_new_tokens, timer),
                           max_new_tokens, reason, timer)

    def _step(self, step: int, source: PromptSource, max_new_tokens: int,
              timer: Timer) -> tuple[list[Group], list[Group], dict]:
        a, r, seed = self.recipe.algorithm, self.recipe.rollout, self.recipe.run.seed
        params = self.sampling(max_new_tokens=max_new_tokens)

        def draw(k: int, i: int) -> list[Group]:
            prompts = source.batch(step, k, stream=f"rl{i}")
            return self.collect(prompts, [derive_seed(seed, step, f"rl{i}", j) for j in range(len(prompts))],
                                params, r.n_samples, timer)

        first = draw(self.recipe.data.prompts_per_step, 0)
        if not a.dynamic_sampling:
            return first, first, {}
        draws = iter(range(1, a.max_refill_draws + 1))
        kept, counts = dynamic_sample(first, lambda k: draw(k, next(draws)), rewards=lambda g: g.rewards[g.valid],
                                      target=len(first), max_draws=a.max_refill_draws)
        return first, kept, {**counts, "trained_groups": len(kept)}

    def _partial_step(self, step: int, source: PromptSource, budget: int,
                      timer: Timer) -> tuple[list[Group], list[Group], dict]:
        """One step of partial rollouts: `prompts_per_step` fresh prompts join the groups in flight (drawn as
        stream `rl0` of the step, each group seeded as in `_step`), so prompts are used at the synchronous
        loop's pace and a step trains about as many groups once the pipeline is full (at most
        ⌈max_new_tokens / partial_tokens⌉ steps' admissions are in flight); every unfinished sample then
        decodes at most `rollout.partial_tokens` tokens. A paused sample continues from its prompt and
        tokens so far, re-prefilled under the current weights, as a request of its own seeded from (its
        group's seed, its length, its index), so what it draws depends on steps and token counts only.
        Groups whose n samples all finished are scored and returned; dynamic sampling drops those without
        spread and does not refill."""
        r, seed = self.recipe.rollout, self.recipe.run.seed
        params = self.sampling(max_new_tokens=budget)
        fresh = source.batch(step, self.recipe.data.prompts_per_step, stream="rl0")
        flight = self.paused + [Paused(p, derive_seed(seed, step, "rl0", j), step, []) for j, p in enumerate(fresh)]
        requests, owners = [], []  # owners[i]: (group, sample index, or None for a fresh group's n samples)
        for g in flight:
            if not g.trajectories:
                chunk = replace(params, max_new_tokens=min(r.partial_tokens, budget))
                requests.append(Request(self.encode(g.prompt), r.n_samples, g.seed, chunk))
                owners.append((g, None))
            for s, t in enumerate(g.trajectories):
                if not done(t, budget):
                    chunk = replace(params, max_new_tokens=min(r.partial_tokens, budget - len(t.response_ids)))
                    requests.append(Request(t.prompt_ids + t.response_ids, 1,
                                            derive_seed(g.seed, len(t.response_ids), "resume", s), chunk))
                    owners.append((g, s))
        with timer("rollout"):
            out = iter(self.rollout.generate(requests))
        for (g, s), request in zip(owners, requests):
            if s is None:
                g.trajectories = [next(out) for _ in range(request.n)]
            else:
                g.trajectories[s].extend(next(out))
        over = [all(done(t, budget) for t in g.trajectories) for g in flight]
        finished = [g for g, f in zip(flight, over) if f]
        self.paused = [g for g, f in zip(flight, over) if not f]
        with timer("reward"):
            self._score([g.prompt for g in finished], [g.trajectories for g in finished])
        groups = [Group(g.prompt, g.trajectories) for g in finished]
        kept = ([g for g in groups if has_spread(g.rewards[g.valid])] if self.recipe.algorithm.dynamic_sampling
                else groups)
        return groups, kept, {"partial_admitted_groups": len(fresh), "partial_finished_groups": len(finished),
                              "partial_paused_groups": len(self.paused),
                              "partial_paused_samples": sum(not done(t, budget) for g in self.paused
                                                            for t in g.trajectories),
                              "trained_groups": len(kept)}

    def close(self) -> None:
        self.background.shutdown(cancel_futures=True)

    def pass_rates(self, prompts: list[Prompt], n: int = 1, k: int = 1, stream: str = "eval") -> list[float]:
        """Each prompt's pass@k (unbiased, from n samples at the rollout temperature; n = 1 is greedy), at
        the full budget; request j is seeded from (run seed, stream, j). A response whose reward could not
        be computed is left out of its prompt's estimate, never counted as a failure, and added to
        `self.unscored`; a prompt with fewer than k scored responses gets NaN."""
        params = self.sampling(temperature=0.0 if n == 1 else None)
        seeds = [derive_seed(self.recipe.run.seed, 0, stream, j) for j in range(len(prompts))]
        rates = []
        for group in self.collect(prompts, seeds, params, n):
            scored = passed(group)
            self.unscored += n - len(scored)
            rates.append(pass_at_k(len(scored), sum(scored), k) if len(scored) >= k else math.nan)
        return rates

    def evaluate(self, prompts: list[Prompt], n: int = 1, k: int = 1) -> float:
        """Mean pass@k (greedy accuracy with n = 1) over the prompts that could be scored; NaN without any.
        Unscored responses are counted in `self.unscored`."""
        rates = [r for r in self.pass_rates(prompts, n, k) if not math.isnan(r)]
        return statistics.fmean(rates) if rates else math.nan


@contextmanager
def running_collector(recipe: Recipe, model_dir: str, hosts: list | None = None):
    """A Collector over `recipe.rollout.num_workers` rollout workers serving the HF model in `model_dir`
    (with its tokenizer) and `reward.num_workers` scoring processes; both are shut down on exit. With
    `hosts` (trainer ranks, resources.colocate) the replicas live in the first of them instead, left running."""
    from cispo.run import start_ray

    tok = load_tokenizer(model_dir)
    start_ray(recipe)
    r = recipe.rollout
    args = (str(model_dir), tok.pad_token_id, r.model_copy(update={"threads": r.threads or recipe.run.threads}))
    if hosts:
        rollout = RolloutPool.hosted(hosts[:r.num_workers], *args, record_routing=recipe.algorithm.routing_replay)
    else:
        # Without trainers (cispo eval, filter), a colocated recipe's replica runs where a rank would.
        res = recipe.resources.trainer if recipe.resources.colocate else recipe.resources.rollout
        rollout = RolloutPool.start(r.num_workers, *args, options=res.ray_options(),
                                    record_routing=recipe.algorithm.routing_replay)
    try:
        with ScoringPool(recipe.reward.num_workers, recipe.reward.timeout_s) as scorer, \
                closing(Collector(recipe, tok, rollout, scorer)) as collector:
            yield collector
    finally:
        rollout.shutdown()
