"""The rollout seam: what an engine is asked (`Request`), what it and a rollout function return
(`Trajectory`, one record per sample), and what a rollout function receives (`RolloutInput`).

A rollout function turns prompts into trajectories by calling the engine, once or several times, and
says which tokens train through each trajectory's loss mask. Recipes choose one as
`rollout.function: module:fn` (default `rollout.trajectory:single_turn`); cispo.collect calls it with
every prompt of a draw and the rollout pool, then scores the trajectories and builds the batch from
their masks, logprobs and versions (cispo.batching.rl_batch).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class SamplingParams:
    max_new_tokens: int = 64  # the engine stops a sample after this many tokens (finish reason "length")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # checked on the decoded text; needs `generate(..., decode=)`
    # M1 stops a generation once this many consecutive tokens each had probability > repetition_prob.
    repetition_tokens: int = 3000
    repetition_prob: float = 0.99


@dataclass
class Request:
    """n samples of one prompt; sample s draws its token at response position t from Philox(seed; t, s).

    `session` names a sequence that comes back (a multi-turn episode, n=1): an engine that keeps state
    (rollout.engine) keeps the session's state after this request, and its next request, whose prompt
    extends this one's tokens, prefills only the new tokens. The output does not depend on it."""
    prompt_ids: list[int]
    n: int = 1
    seed: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    session: int | None = None


@dataclass
class Trajectory:
    """One sample: a prompt, the R tokens after it, and what training needs of each.

    Per-token lists all have length R (the response tokens, in order):
    - response_ids: every token after the prompt, sampled or not (a tool's output spliced in is too);
    - logprobs: fp32 log π(token) under the weights that sampled it, at the sampling temperature
      (π_old of the loss); 0.0 for a token the policy did not sample;
    - loss_mask: 1 for a token that gets a loss, 0 for one that does not (a token the policy did not
      sample must be 0: it has no rollout logprob);
    - versions: the weight version that sampled each token (the trainer step whose weights the
      engine held, 0 for the starting model); -1 for a token the policy did not sample.
    `finish_reason` is how the last sampling call ended: stop | length | repetition. `reward` and
    `status` are set by scoring (cispo.collect): the score, and ok | error | timeout | sandbox_error
    (only ok scores are the response's own; the others are the scorer's fallback); None before. A
    rollout function that rewards its samples itself (an environment's return) sets both, and scoring
    leaves them; its status env_error means the environment failed, so the sample does not train.
    `outcomes` counts what happened in the sample (a multi-turn episode's turns, tool results, why it
    ended), summed over a draw into the rollout metrics as `episode_<name>`.
    `routing`, when the engine recorded it (MoE routing replay, rollout.routing), is a tensor
    [len(prompt_ids) + R - 1, MoE layers, k] of the experts each token fed to the model was routed to (every
    token but the last, which is never fed), -1 where not recorded; None otherwise.
    """
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    versions: list[int]
    finish_reason: str
    reward: float | None = None
    status: str | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    routing: Tensor | None = None

    @classmethod
    def sampled(cls, prompt_ids: list[int], response_ids: list[int], logprobs: list[float], finish_reason: str,
                version: int, routing: Tensor | None = None) -> Trajectory:
        """An engine's sample: every token sampled by weights `version`, every token trains."""
        n = len(response_ids)
        return cls(list(prompt_ids), list(response_ids), list(logprobs), [1] * n, [version] * n, finish_reason,
                   routing=routing)

    def extend(self, other: Trajectory) -> None:
        """Append `other`'s response tokens (a later call continuing this sample, whose prompt is this
        sample's tokens so far): its finish reason wins, and so does its routing, which re-prefilled the
        earlier tokens, except where it has none recorded (a kept session's tokens)."""
        for name in ("response_ids", "logprobs", "loss_mask", "versions"):
            getattr(self, name).extend(getattr(other, name))
        self.finish_reason = other.finish_reason
        if other.routing is not None:
            if self.routing is not None:
                n = min(len(self.routing), len(other.routing))
                other.routing[:n] = other.routing[:n].where(other.routing[:n] >= 0, self.routing[:n])
            self.routing = other.routing

    def insert(self, token_ids: list[int]) -> None:
        """Append tokens the policy did not sample (a tool's output): no logprob, no loss, version -1."""
        self.response_ids += token_ids
        self.logprobs += [0.0] * len(token_ids)
        self.loss_mask += [0] * len(token_ids)
        self.versions += [-1] * len(token_ids)


@dataclass
class RolloutInput:
    """One prompt of a draw, as a rollout function receives it: its text, its token ids (as the
    tokenizer or chat template encodes it), the recipe's sampling parameters (their `max_new_tokens`
    is the step's budget), the seed of its random streams and n, the samples it wants; then the data
    row's answer, source name and other columns (what an environment resets to).

    A function that calls the engine again for the same sample (a second turn) should seed that call
    apart, e.g. `seed + turn`: a call's streams restart at response position 0.
    """
    text: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    n: int
    answer: str = ""
    source: str = ""
    fields: dict = field(default_factory=dict)

    def request(self) -> Request:
        return Request(self.prompt_ids, n=self.n, seed=self.seed, params=self.params)


# fn(inputs, engine) -> one list of n trajectories per input, in input order. `engine` offers
# `generate(requests: list[Request]) -> list[Trajectory]` (request order, then sample order), one
# batch over every rollout worker per call. A recipe may name a class instead: cispo.collect builds it once as
# `Class(recipe, tokenizer)` and calls the instance (cispo.multiturn.Episodes is one).
RolloutFunction = Callable[[list[RolloutInput], object], list[list[Trajectory]]]


def single_turn(inputs: list[RolloutInput], engine) -> list[list[Trajectory]]:
    """The default rollout function: one request per prompt, all in one engine call; every sampled
    token trains."""
    flat = iter(engine.generate([x.request() for x in inputs]))
    return [[next(flat) for _ in range(x.n)] for x in inputs]
