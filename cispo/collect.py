"""The one collection path: prompts -> requests -> completions -> scored groups.

Training (with dynamic sampling's refill), `cispo eval` and `cispo filter` all collect through a
`Collector`, so they cannot disagree on how a prompt becomes token ids, how requests are seeded, which
sampling parameters apply, or which reward scores which data source.
"""
from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cispo.config import Recipe, RecipeError
from cispo.data import Prompt, PromptSource, derive_seed
from cispo.metrics import Timer, percentile
from cispo.sampling import dynamic_sample, has_spread
from rewards.pool import ScoringPool
from rewards.types import RewardInput
from rollout.engine import Completion, Request, SamplingParams
from rollout.model import load_tokenizer
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
    """One prompt's G responses and their rewards."""
    prompt: Prompt
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: torch.Tensor  # [G]
    statuses: list[str]    # ok | error | timeout | sandbox_error, per response

    @property
    def valid(self) -> torch.Tensor:
        """[G] bool: the responses whose reward judged them. A sandbox failure is the harness's fault, not
        the response's: it is left out of the group's baseline and spread (cispo.advantages), so dynamic
        sampling sees what the real outcomes say, and gets no loss (verl PR #6375). A reward error or
        timeout still scores 0: a response can cause either (a program that runs too long, text the
        reward chokes on)."""
        return torch.tensor([s != "sandbox_error" for s in self.statuses], dtype=torch.bool)


def passed(group: Group) -> list[bool]:
    """Pass or fail for each response whose reward could be computed (status ok); a pass is a full score:
    every test for code, a correct answer for math. A response that errored or timed out is neither."""
    return [float(r) >= 1.0 for r, s in zip(group.rewards, group.statuses) if s == "ok"]


def rollout_metrics(groups: list[Group]) -> dict:
    """What one draw of scored groups looked like, before dynamic sampling chose."""
    completions = [c for g in groups for c in g.completions]
    lengths = [len(c.token_ids) for c in completions]
    statuses = [s for g in groups for s in g.statuses]
    return {"reward_mean": float(torch.cat([g.rewards for g in groups]).mean()),
            "response_length_mean": statistics.fmean(lengths), "response_length_p99": percentile(lengths, 99),
            "finish_length_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "finish_repetition_fraction": sum(c.finish_reason == "repetition" for c in completions) / len(completions),
            "zero_spread_groups": sum(not has_spread(g.rewards[g.valid]) for g in groups),
            # exp(−mean token logprob) of what was generated: the 80k stage rule waits for it to settle.
            "response_perplexity": math.exp(-sum(sum(c.logprobs) for c in completions)
                                            / max(1, sum(len(c.logprobs) for c in completions))),
            **{f"reward_{k}": statuses.count(k) for k in ("error", "timeout", "sandbox_error")}}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, Eq. 1): 1 − C(n−c, k)/C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Collector:
    """Generates and scores responses for a recipe: `rollout` is anything with `submit(requests)`
    (cispo's RolloutPool), `scorer` a ScoringPool; the reward of each data source comes from the recipe."""

    def __init__(self, recipe: Recipe, tok, rollout, scorer: ScoringPool):
        self.recipe, self.tok, self.rollout, self.scorer = recipe, tok, rollout, scorer
        self.rewards = recipe.rewards()  # RecipeError naming the key for a reward that cannot load
        self.unscored = 0  # responses pass_rates could not score (reward error, timeout, sandbox error)

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
        """n responses per prompt, each request seeded by its entry in `seeds`, scored by its source's reward."""
        timer = timer or Timer()
        ids = [self.encode(p) for p in prompts]
        requests = [Request(i, n=n, seed=seed, params=params) for i, seed in zip(ids, seeds)]
        with timer("rollout"):
            completions = self.rollout.submit(requests).result()
        with timer("reward"):
            rewards, statuses = self._score(prompts, completions)
        return [Group(p, ids[i], completions[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n],
                      statuses[i * n:(i + 1) * n]) for i, p in enumerate(prompts)]

    def _score(self, prompts: list[Prompt], completions: list[Completion]) -> tuple[torch.Tensor, list[str]]:
        texts = self.tok.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        results = [None] * len(completions)
        for name in dict.fromkeys(p.source for p in prompts):
            if name not in self.rewards:  # a row's own source (a mapped source column, verl's data_source)
                self.rewards[name] = self.recipe.source_reward(name)
            reward = self.rewards[name]
            rows = [i for i, c in enumerate(completions) if prompts[c.request_index].source == name]
            inputs = [RewardInput(p.text, texts[i], p.answer, p.source, tuple(completions[i].token_ids), p.fields)
                      for i in rows for p in [prompts[completions[i].request_index]]]
            for i, result in zip(rows, self.scorer.map(reward, inputs)):
                results[i] = result
        return torch.tensor([r.score for r in results]), [r.status for r in results]

    def step(self, source: PromptSource, step: int, window: int, timer: Timer) -> tuple[list[Group], list[Group], dict]:
        """One RL step's groups: (the first draw, the groups to train on, dynamic-sampling counts).

        With dynamic sampling (DAPO, M1) groups whose rewards all agree carry no signal; they are
        dropped and refilled with fresh prompts (draw i of the step is stream `rl{i}`). Requests are
        seeded from (run seed, step, draw, index), so a resumed run draws what the original would have.
        """
        a, r, seed = self.recipe.algorithm, self.recipe.rollout, self.recipe.run.seed
        params = self.sampling(max_new_tokens=window)

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
def running_collector(recipe: Recipe, model_dir: str):
    """A Collector over `recipe.rollout.num_workers` rollout workers serving the HF model in `model_dir`
    (with its tokenizer) and `reward.num_workers` scoring processes; both are shut down on exit."""
    from cispo.run import start_ray

    tok = load_tokenizer(model_dir)
    start_ray(recipe)
    r = recipe.rollout
    rollout = RolloutPool.start(r.num_workers, str(model_dir), tok.pad_token_id,
                                r.model_copy(update={"threads": r.threads or recipe.run.threads}),
                                options=recipe.resources.rollout.ray_options())
    try:
        with ScoringPool(recipe.reward.num_workers, recipe.reward.timeout_s) as scorer:
            yield Collector(recipe, tok, rollout, scorer)
    finally:
        rollout.shutdown()
