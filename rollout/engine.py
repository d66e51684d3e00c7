"""Our decode loop over MiniMaxForCausalLM: shared-prompt prefill, per-request seeds, fp32 logprobs.

Each prompt is prefilled once and its cache replicated for its n samples: linear layers hold an O(1)
state, so replication costs a [heads, d, d] copy per layer plus the softmax layers' KV. Finished rows
leave the batch at once, so a long-tailed group costs only its live rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rollout.model import fp32_logits, new_cache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
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


def _row_generator(seed: int, sample_index: int) -> torch.Generator:
    # The stream depends only on (request seed, sample index), never on batch neighbours.
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_index)


def _sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]):
    """Sample one token per row; returns (tokens, logprob of token, probability of token)."""
    greedy = torch.tensor([p.temperature == 0 for p in params])
    # Greedy rows report logprobs of the untempered policy.
    temps = torch.tensor([p.temperature or 1.0 for p in params]).unsqueeze(1)
    logprobs = torch.log_softmax(logits / temps, dim=-1)
    probs = logprobs.exp()
    filtered = probs.clone()
    for i, p in enumerate(params):
        if p.top_k > 0:
            kth = torch.topk(filtered[i], min(p.top_k, filtered.shape[1])).values[-1]
            filtered[i][filtered[i] < kth] = 0
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(filtered[i], descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p
            filtered[i][order[drop]] = 0
    uniforms = torch.stack([torch.rand((), generator=g) for g in gens]).unsqueeze(1)
    cdf = (filtered / filtered.sum(-1, keepdim=True)).cumsum(-1)
    sampled = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).squeeze(1).clamp(max=logits.shape[1] - 1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    chosen_logprob = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, chosen_logprob, chosen_logprob.exp()


@torch.no_grad()
def generate(model, requests: list[Request], pad_id: int, weight_version: int = 0) -> list[Completion]:
    """Generate every request's n samples in one batch; returns completions in request order."""
    device = next(model.parameters()).device
    # 1. Prefill each distinct prompt once, left-padded.
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    cache = new_cache(model)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                      cache=cache, use_cache=True)
    last_logits = fp32_logits(model, out.last_hidden_state[:, -1])

    # 2. Replicate each prompt's state for its samples.
    repeats = torch.tensor([r.n for r in requests])
    rows = torch.repeat_interleave(torch.arange(len(requests)), repeats)
    cache.batch_select_indices(rows.to(device))
    logits, mask = last_logits[rows], mask[rows]
    next_pos = mask.sum(1)
    owners = [(int(q), s) for q in range(len(requests)) for s in range(requests[q].n)]
    params = [requests[q].params for q, _ in owners]
    gens = [_row_generator(requests[q].seed, s) for q, s in owners]
    tokens: list[list[int]] = [[] for _ in owners]
    logps: list[list[float]] = [[] for _ in owners]
    confident_run = [0] * len(owners)
    finish: list[str | None] = [None] * len(owners)
    live = list(range(len(owners)))  # row in batch -> owner index

    # 3. Decode; finished rows leave the batch.
    while live:
        tok, logp, prob = _sample(logits, [params[o] for o in live], [gens[o] for o in live])
        keep = []
        for row, o in enumerate(live):
            t, p = int(tok[row]), params[o]
            tokens[o].append(t)
            logps[o].append(float(logp[row]))
            confident_run[o] = confident_run[o] + 1 if prob[row] > p.repetition_prob else 0
            if t in p.stop_token_ids:
                finish[o] = "stop"
            elif confident_run[o] >= p.repetition_tokens:
                finish[o] = "repetition"
            elif len(tokens[o]) >= p.max_new_tokens:
                finish[o] = "length"
            else:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep)
            cache.batch_select_indices(index.to(device))
            tok, mask, next_pos = tok[index], mask[index], next_pos[index]
            live = [live[r] for r in keep]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        out = model.model(input_ids=tok.unsqueeze(1).to(device), attention_mask=mask.to(device),
                          position_ids=next_pos.unsqueeze(1).to(device), cache=cache, use_cache=True)
        logits = fp32_logits(model, out.last_hidden_state[:, -1])
        next_pos = next_pos + 1

    return [Completion(q, s, tokens[o], logps[o], finish[o], weight_version) for o, (q, s) in enumerate(owners)]
