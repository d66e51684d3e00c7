"""Our decode loop over any supported HF causal LM: continuous batching, shared-prompt prefill,
counter-based per-row random streams, fp32 logprobs.

Each prompt is prefilled once and its cache forked for its n samples: a linear-state layer holds an
O(1) state (rollout.states: a matrix state, plus a short-conv state for GDN, KDA and Mamba2), so
forking copies those per layer plus the softmax layers' KV (dense models: KV only). Every family
(rollout.families) runs through the same `StateCache` operations, so this loop knows none of them. Finished rows leave the batch at once and queued requests take their place,
so a long-tailed batch costs only its live rows. Rows never influence each other: each has its own
random stream (rollout.sampling), positions and mask.

Per step the host sees one small transfer (token, logprob and finish code per row): sampling,
repetition counting and stop-token and length checks run on the model's device, vectorized over
rows. Stop strings are the exception: they need the decoded text, so only rows that have them are
decoded on the host.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from rollout.config import RolloutConfig
from rollout.kernels import use_fla_lightning
from rollout.model import head_logits, new_cache, use_decode_attention
from rollout.states import StateCache
from rollout.sampling import sample, seed_key, uniforms
from rollout.trajectory import Request, SamplingParams, Trajectory


FINISH_REASONS = (None, "stop", "repetition", "length")  # indexed by the device-side finish code


@dataclass
class _Sample:
    """One sequence being generated, on the host: request q's sample s."""
    q: int
    s: int
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None

    def ends_with_stop_string(self, decode) -> bool:
        # Checked after every token, so a stop string can only end at the newest one: decoding as
        # many tail tokens as it has characters covers it (a token decodes to at least one).
        strings = self.params.stop_strings
        tail = decode(self.tokens[-max(map(len, strings)):])
        return any(s in tail for s in strings)


@dataclass
class _Rows:
    """Each running row's sampling state as [rows, ...] tensors on the model's device."""
    keys: torch.Tensor               # [rows, 2] Philox key words of the request seed
    sample_index: torch.Tensor       # [rows]
    generated: torch.Tensor          # [rows] tokens generated so far: the next token's response position
    temperature: torch.Tensor        # [rows] fp32; 0 is greedy
    top_k: torch.Tensor              # [rows] int64; 0 disables
    top_p: torch.Tensor              # [rows] fp32
    max_new_tokens: torch.Tensor     # [rows]
    repetition_tokens: torch.Tensor  # [rows]
    repetition_prob: torch.Tensor    # [rows] fp32
    confident_run: torch.Tensor      # [rows] consecutive tokens with probability > repetition_prob
    stop_ids: torch.Tensor           # [rows, stops] stop token ids, padded with -1

    @classmethod
    def of(cls, samples: list[_Sample], seeds: list[int], stops: int, device) -> _Rows:
        p = [s.params for s in samples]
        col = lambda values, dtype=torch.long: torch.tensor(values, dtype=dtype, device=device)
        stop_ids = [list(x.stop_token_ids) + [-1] * (stops - len(x.stop_token_ids)) for x in p]
        return cls(col([seed_key(seed) for seed in seeds]), col([s.s for s in samples]), col([0] * len(p)),
                   col([x.temperature for x in p], torch.float32), col([x.top_k for x in p]),
                   col([x.top_p for x in p], torch.float32), col([x.max_new_tokens for x in p]),
                   col([x.repetition_tokens for x in p]), col([x.repetition_prob for x in p], torch.float32),
                   col([0] * len(p)), col(stop_ids).view(len(p), stops))

    def select(self, rows: torch.Tensor) -> _Rows:
        return _Rows(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def cat(self, other: _Rows) -> _Rows:
        return _Rows(**{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)})

    def advance(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Count the sampled tokens in; returns each row's finish code (index into FINISH_REASONS)."""
        self.generated = self.generated + 1
        confident = logprobs.exp() > self.repetition_prob
        self.confident_run = torch.where(confident, self.confident_run + 1, 0)
        stop = (tokens.unsqueeze(1) == self.stop_ids).any(1)
        return torch.where(stop, 1, torch.where(self.confident_run >= self.repetition_tokens, 2,
                                                torch.where(self.generated >= self.max_new_tokens, 3, 0)))


@dataclass
class _Batch:
    """The running rows: their cache, left-padded attention mask, next positions and pending logits."""
    cache: StateCache
    mask: torch.Tensor       # [rows, cache length + pending]; 0 marks padding
    next_pos: torch.Tensor   # [rows] position of each row's next token
    logits: torch.Tensor     # [rows, vocab] fp32, to sample each row's next token from
    rows: _Rows
    samples: list[_Sample]

    def __post_init__(self):
        # Known on the host whenever rows change, so that sampling never asks the device which rows
        # need the top-k/top-p sort, and only stop-string rows are decoded as text.
        filtered = [i for i, s in enumerate(self.samples) if s.params.top_k or s.params.top_p < 1]
        self.filtered = torch.tensor(filtered, dtype=torch.long, device=self.mask.device)
        self.text_rows = [i for i, s in enumerate(self.samples) if s.params.stop_strings]


def _prefill(model, requests: list[Request], samples: list[list[_Sample]], pad_id: int, stops: int,
             head_dtype: torch.dtype) -> _Batch:
    """Prefill each prompt once, left-padded, then replicate its state for its samples."""
    device = model.lm_head.weight.device
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
    logits = head_logits(model, out.last_hidden_state[:, -1], head_dtype)
    flat = [s for group in samples for s in group]
    state = _Rows.of(flat, [requests[i].seed for i, g in enumerate(samples) for _ in g], stops, device)
    return _Batch(cache, mask[rows], mask[rows].sum(1), logits[rows], state, flat)


def _join(batch: _Batch | None, new: _Batch) -> _Batch:
    """Append new rows to the running batch: KV and masks are left-padded to a common length."""
    if batch is None:
        return new
    pad_old, pad_new = batch.cache.extend(new.cache)
    mask = torch.cat([F.pad(batch.mask, (pad_old, 0)), F.pad(new.mask, (pad_new, 0))])
    return _Batch(batch.cache, mask, torch.cat([batch.next_pos, new.next_pos]), torch.cat([batch.logits, new.logits]),
                  batch.rows.cat(new.rows), batch.samples + new.samples)


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
    return _Batch(batch.cache, mask[:, drop:], batch.next_pos[rows], batch.logits[rows], batch.rows.select(rows),
                  [batch.samples[r] for r in keep])


def decode_step(model, cache: StateCache, mask: torch.Tensor, positions: torch.Tensor,
                tokens: torch.Tensor, head_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Feed each row one token; returns the next logits [rows, vocab] (fp32, from a `head_dtype` head).

    `mask` [rows, cache length + 1] (0 marks left padding) already includes the new token;
    `positions` and `tokens` are [rows]. The cache advances by one position.
    """
    out = model.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions.unsqueeze(1),
                      cache=cache, use_cache=True)
    return head_logits(model, out.last_hidden_state[:, -1], head_dtype)


def _step(batch: _Batch, decode) -> tuple[torch.Tensor, list[int]]:
    """Sample every row's next token and record it; returns (tokens, rows that go on)."""
    r = batch.rows
    u = uniforms(r.keys, r.sample_index, r.generated)
    tokens, logprobs = sample(batch.logits, u, r.temperature, r.top_k, r.top_p, batch.filtered)
    codes = r.advance(tokens, logprobs)
    # The step's one host transfer; fp64 holds token ids and fp32 logprobs exactly.
    host_tokens, host_logprobs, host_codes = torch.stack([tokens.double(), logprobs.double(), codes.double()]).tolist()
    for s, t, lp, code in zip(batch.samples, host_tokens, host_logprobs, host_codes):
        s.tokens.append(int(t))
        s.logprobs.append(lp)
        s.finish = FINISH_REASONS[int(code)]
    for i in batch.text_rows:
        s = batch.samples[i]
        if s.finish != "stop" and s.ends_with_stop_string(decode):
            s.finish = "stop"
    return tokens, [i for i, s in enumerate(batch.samples) if s.finish is None]


def _admit(queue: deque, requests: list[Request], live: int, max_batch_rows: int) -> list[int]:
    """Requests (in queue order) whose samples fit beside `live` rows; at least one if none run."""
    taken = []
    while queue and (live + requests[queue[0]].n <= max_batch_rows or live == 0):
        live += requests[queue[0]].n
        taken.append(queue.popleft())
    return taken


@torch.no_grad()
def generate(model, requests: list[Request], pad_id: int, weight_version: int = 0,
             max_batch_rows: int = 256, decode=None, head_dtype: torch.dtype = torch.float32) -> list[Trajectory]:
    """Generate every request's n samples; returns trajectories in request order, then sample order,
    each token tagged `weight_version`.

    At most `max_batch_rows` sequences decode together (a request's samples are admitted together,
    since they share one prefill); queued requests join as rows finish. Sample s of a request with
    seed x draws its token at response position t from Philox(x; t, s) (rollout.sampling), so its
    output does not depend on the batch. The LM head runs in fp32 (M1 §3.2); `head_dtype=torch.bfloat16`
    is the pre-fix head, for experiments/fp32_head.py. Raises ValueError if a request has stop strings
    and no `decode` (token ids -> text) is given.
    """
    if decode is None and any(r.params.stop_strings for r in requests):
        raise ValueError("stop_strings need generate(..., decode=tokenizer.decode)")
    samples = [[_Sample(q, s, r.params) for s in range(r.n)] for q, r in enumerate(requests)]
    stops = max([len(r.params.stop_token_ids) for r in requests], default=0)
    queue, batch = deque(range(len(requests))), None
    while queue or batch:
        joining = _admit(queue, requests, len(batch.samples) if batch else 0, max_batch_rows)
        if joining:
            new = _prefill(model, [requests[q] for q in joining], [samples[q] for q in joining], pad_id, stops,
                           head_dtype)
            batch = _join(batch, new)
        tokens, keep = _step(batch, decode)
        batch = _leave(batch, keep)
        if batch:
            batch.mask = F.pad(batch.mask, (0, 1), value=1)
            batch.logits = decode_step(model, batch.cache, batch.mask, batch.next_pos,
                                       tokens[torch.tensor(keep, device=tokens.device)], head_dtype)
            batch.next_pos = batch.next_pos + 1
    return [Trajectory.sampled(requests[s.q].prompt_ids, s.tokens, s.logprobs, s.finish, weight_version)
            for group in samples for s in group]


class Engine:
    """The rollout engine interface, and what every engine shares.

    An engine is built as `Engine(model, config, pad_id, tokenizer)` from a loaded HF causal LM on its
    device, and offers `generate(requests) -> list[Trajectory]` (request order, then sample order,
    each token tagged with `self.version`), `load_weights(state_dict, version)` and `close()`. A new
    engine subclasses this, writes `generate`, and is registered with one line in rollout.worker.ENGINES
    (and its name in rollout.config's `engine`).
    """

    def __init__(self, model, config: RolloutConfig, pad_id: int, tokenizer=None):
        self.model, self.config, self.pad_id, self.tokenizer, self.version = model.eval(), config, pad_id, tokenizer, 0

    def load_weights(self, state_dict: dict, version: int) -> None:
        """Copy `state_dict` (any dtype, any device) into the model, cast to each parameter's dtype;
        tokens sampled from now on carry `version`."""
        self.model.load_state_dict(state_dict)
        self.version = version

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class CispoEngine(Engine):
    """This module's `generate` as an engine. It switches the model to the decode attention kernel and
    MoE experts to grouped GEMMs, and keeps the LM head in fp32 (M1 §3.2) whatever the body's dtype; on
    CUDA a MiniMax model's lightning attention runs fla's kernels (rollout.kernels).
    `head_dtype=torch.bfloat16` keeps the head in bf16 instead, as M1 had it before its fix; only
    experiments/fp32_head.py asks for it.
    """

    def __init__(self, model, config: RolloutConfig, pad_id: int, tokenizer=None,
                 head_dtype: torch.dtype = torch.float32):
        super().__init__(model, config, pad_id, tokenizer)
        use_decode_attention(self.model)
        self.head_dtype = head_dtype
        self.model.lm_head.to(head_dtype)  # its weights then arrive from load_weights in this dtype too
        if getattr(self.model.config, "_experts_implementation", None) == "eager":
            # One grouped GEMM per projection instead of a Python loop over experts with a host sync
            # (nonzero) in each MoE layer: 12% faster on the CPU benchmark, same tokens and logprobs.
            # Training keeps eager experts (grouped_mm's backward gave NaN, docs/notes.md#model); this is inference.
            self.model.config._experts_implementation = "grouped_mm"
        if self.model.lm_head.weight.is_cuda and self.model.config.model_type == "minimax":
            try:
                use_fla_lightning(self.model)
            except ImportError as e:
                print(f"warning: {e}; lightning attention stays on the torch path", flush=True)

    def generate(self, requests: list[Request]) -> list[Trajectory]:
        return generate(self.model, requests, self.pad_id, self.version, self.config.max_batch_rows,
                        decode=self._text if self.tokenizer is not None else None, head_dtype=self.head_dtype)

    def _text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


