"""Our decode loop over MiniMaxForCausalLM: continuous batching, shared-prompt prefill, per-request
seeds, fp32 logprobs.

Each prompt is prefilled once and its cache replicated for its n samples: linear layers hold an O(1)
state, so replication costs a [heads, d, d] copy per layer plus the softmax layers' KV. Finished rows
leave the batch at once and queued requests take their place, so a long-tailed batch costs only its
live rows. Rows never influence each other: each has its own random stream, positions and mask.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rollout.model import HybridCache, fp32_logits, new_cache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
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
    prompt_ids: list[int]
    n: int = 1
    seed: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    request_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | repetition
    weight_version: int = 0


@dataclass
class _Sample:
    """One sequence being generated: request q's sample s."""
    q: int
    s: int
    params: SamplingParams
    # The stream depends only on (request seed, sample index), never on batch neighbours.
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    confident_run: int = 0
    finish: str | None = None

    def record(self, token: int, logprob: float, prob: float, decode=None) -> bool:
        """Append a sampled token; True while the sequence goes on."""
        p = self.params
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.confident_run = self.confident_run + 1 if prob > p.repetition_prob else 0
        if token in p.stop_token_ids or self._ends_with_stop_string(decode):
            self.finish = "stop"
        elif self.confident_run >= p.repetition_tokens:
            self.finish = "repetition"
        elif len(self.tokens) >= p.max_new_tokens:
            self.finish = "length"
        return self.finish is None

    def _ends_with_stop_string(self, decode) -> bool:
        # Checked after every token, so a stop string can only end at the newest one: decoding as
        # many tail tokens as it has characters covers it (a token decodes to at least one).
        strings = self.params.stop_strings
        if not strings:
            return False
        if decode is None:
            raise ValueError("stop_strings need generate(..., decode=tokenizer.decode)")
        tail = decode(self.tokens[-max(map(len, strings)):])
        return any(s in tail for s in strings)


@dataclass
class _Batch:
    """The running rows: their cache, left-padded attention mask, next positions and pending logits."""
    cache: HybridCache
    mask: torch.Tensor       # [rows, cache length + pending]; 0 marks padding
    next_pos: torch.Tensor   # [rows] position of each row's next token
    logits: torch.Tensor     # [rows, vocab] fp32, to sample each row's next token from
    samples: list[_Sample]


def _sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]):
    """Sample one token per row; returns (tokens, logprob of token, probability of token).

    A row's uniform draw is inverted over its CDF, so its token depends only on its own logits and
    stream. Rows with top-k/top-p use the CDF over their filtered, sorted distribution; the others
    skip the sort (a third of decode time at a 4k vocabulary). Logprobs are of the full tempered
    distribution, which is what the trainer recomputes.
    """
    device, vocab = logits.device, logits.shape[1]
    greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    # Greedy rows report logprobs of the untempered policy.
    temperatures = torch.tensor([p.temperature or 1.0 for p in params], device=device).unsqueeze(1)
    logprobs = torch.log_softmax(logits / temperatures, -1)
    probs, order = logprobs.exp(), torch.arange(vocab, device=device).expand_as(logits).clone()
    filtered = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1]
    if filtered:
        rows = torch.tensor(filtered, device=device)
        probs[rows], order[rows] = _top_k_top_p(probs[rows], [params[i] for i in filtered])
    cdf = probs.cumsum(-1)
    uniforms = torch.stack([torch.rand((), generator=g) for g in gens]).to(device).unsqueeze(1)
    picked = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp(max=vocab - 1)
    tokens = torch.where(greedy, logits.argmax(-1), order.gather(1, picked).squeeze(1))
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, chosen, chosen.exp()


def _top_k_top_p(probs: torch.Tensor, params: list[SamplingParams]):
    """Sorted probabilities with those outside top-k, then top-p (of the top-k renormalized), zeroed."""
    device, vocab = probs.device, probs.shape[1]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=device)
    sorted_probs = sorted_probs * (rank < torch.tensor([p.top_k or vocab for p in params], device=device)[:, None])
    before = sorted_probs.cumsum(-1) - sorted_probs
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    return sorted_probs * (before < top_p * sorted_probs.sum(-1, keepdim=True)), order


def _prefill(model, requests: list[Request], samples: list[list[_Sample]], pad_id: int) -> _Batch:
    """Prefill each prompt once, left-padded, then replicate its state for its samples."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = new_cache(model)
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                      cache=cache, use_cache=True)
    rows = torch.repeat_interleave(torch.arange(len(requests), device=device),
                                   torch.tensor([r.n for r in requests], device=device))
    cache.select(rows)
    logits = fp32_logits(model, out.last_hidden_state[:, -1])
    return _Batch(cache, mask[rows], mask[rows].sum(1), logits[rows], [s for group in samples for s in group])


def _join(batch: _Batch | None, new: _Batch) -> _Batch:
    """Append new rows to the running batch: KV and masks are left-padded to a common length."""
    if batch is None:
        return new
    pad_old, pad_new = batch.cache.extend(new.cache)
    mask = torch.cat([F.pad(batch.mask, (pad_old, 0)), F.pad(new.mask, (pad_new, 0))])
    return _Batch(batch.cache, mask, torch.cat([batch.next_pos, new.next_pos]),
                  torch.cat([batch.logits, new.logits]), batch.samples + new.samples)


def _leave(batch: _Batch, keep: list[int]) -> _Batch | None:
    """Drop finished rows, and the leading KV positions that are padding in every remaining row."""
    if not keep:
        return None
    if len(keep) == len(batch.samples):
        return batch
    rows = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[rows]
    drop = int(mask.any(0).long().argmax())  # first position some row attends to
    batch.cache.select(rows, drop_left=drop)
    return _Batch(batch.cache, mask[:, drop:], batch.next_pos[rows], batch.logits[rows],
                  [batch.samples[r] for r in keep])


def _decode(model, batch: _Batch, tokens: torch.Tensor) -> None:
    """Feed each row its sampled token; leaves the next logits pending."""
    batch.mask = F.pad(batch.mask, (0, 1), value=1)
    out = model.model(input_ids=tokens.unsqueeze(1), attention_mask=batch.mask,
                      position_ids=batch.next_pos.unsqueeze(1), cache=batch.cache, use_cache=True)
    batch.logits = fp32_logits(model, out.last_hidden_state[:, -1])
    batch.next_pos = batch.next_pos + 1


def _admit(queue: deque, requests: list[Request], live: int, max_batch_rows: int) -> list[int]:
    """Requests (in queue order) whose samples fit beside `live` rows; at least one if none run."""
    taken = []
    while queue and (live + requests[queue[0]].n <= max_batch_rows or live == 0):
        live += requests[queue[0]].n
        taken.append(queue.popleft())
    return taken


@torch.no_grad()
def generate(model, requests: list[Request], pad_id: int, weight_version: int = 0,
             max_batch_rows: int = 256, decode=None) -> list[Completion]:
    """Generate every request's n samples; returns completions in request order, then sample order.

    At most `max_batch_rows` sequences decode together (a request's samples are admitted together,
    since they share one prefill); queued requests join as rows finish.
    """
    samples = [[_Sample(q, s, r.params, torch.Generator().manual_seed(r.seed * 1_000_003 + s)) for s in range(r.n)]
               for q, r in enumerate(requests)]
    queue, batch = deque(range(len(requests))), None
    while queue or batch:
        joining = _admit(queue, requests, len(batch.samples) if batch else 0, max_batch_rows)
        if joining:
            new = _prefill(model, [requests[q] for q in joining], [samples[q] for q in joining], pad_id)
            batch = _join(batch, new)
        tokens, logps, probs = _sample(batch.logits, [s.params for s in batch.samples], [s.gen for s in batch.samples])
        draws = zip(batch.samples, tokens.tolist(), logps.tolist(), probs.tolist())
        keep = [row for row, (s, *draw) in enumerate(draws) if s.record(*draw, decode)]
        batch = _leave(batch, keep)
        if batch:
            _decode(model, batch, tokens[torch.tensor(keep, device=tokens.device)])
    return [Completion(s.q, s.s, s.tokens, s.logprobs, s.finish, weight_version) for group in samples for s in group]
