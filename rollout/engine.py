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
from rollout.routing import RoutingRecorder
from rollout.states import KeptStates, StateCache
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
    routing: list[torch.Tensor] = field(default_factory=list)  # [positions, MoE layers, k] chunks, when recorded

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
    return _forward(model, requests, samples, new_cache(model), ids, mask, (mask.cumsum(1) - 1).clamp(min=0), stops,
                    head_dtype)


def _resume(model, requests: list[Request], samples: list[list[_Sample]], kept: list[tuple[list[int], StateCache]],
            stops: int, head_dtype: torch.dtype) -> _Batch:
    """Prefill only what follows each request's kept state: its prompt past the kept tokens, the same
    length L in every request here. The kept one-row caches are joined (softmax KV left-padded to a
    common length); the L new tokens are never padded, since a padded token would still decay a linear
    layer's state."""
    device = model.lm_head.weight.device
    cache, mask = None, None
    for tokens, row in kept:
        ones = torch.ones((1, len(tokens)), dtype=torch.long, device=device)
        if cache is None:
            cache, mask = row, ones
        else:
            pad_old, pad_new = cache.extend(row)
            mask = torch.cat([F.pad(mask, (pad_old, 0)), F.pad(ones, (pad_new, 0))])
    ids = torch.tensor([r.prompt_ids[len(tokens):] for r, (tokens, _) in zip(requests, kept)], device=device)
    positions = mask.sum(1, keepdim=True) + torch.arange(ids.shape[1], device=device)
    return _forward(model, requests, samples, cache, ids, torch.cat([mask, torch.ones_like(ids)], 1), positions,
                    stops, head_dtype)


def _forward(model, requests, samples, cache: StateCache, ids: torch.Tensor, mask: torch.Tensor,
             positions: torch.Tensor, stops: int, head_dtype: torch.dtype) -> _Batch:
    """Run `ids` [requests, L] through the model on `cache` (mask [requests, cache length + L]), then fork
    each request's row to its samples: the new rows of a batch."""
    device = ids.device
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
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


def _admit_rows(model, batch: _Batch | None, joining: list[int], requests: list[Request], samples, pad_id: int,
                stops: int, head_dtype, kept: KeptStates | None, resumed: set[int],
                recorder: RoutingRecorder | None) -> _Batch:
    """Prefill the joining requests into the batch: those with a kept session state from it (grouped by
    how many new tokens they have), the others whole. Adds the resumed ones to `resumed`. With `recorder`,
    each sample starts its routing with its prompt's, -1 over a kept state's tokens (not prefilled here)."""
    states = {q: kept.take(requests[q].session, requests[q].prompt_ids) for q in joining} if kept else {}
    groups: dict[int, list[int]] = {}
    for q in (q for q in joining if states.get(q)):
        groups.setdefault(len(requests[q].prompt_ids) - len(states[q][0]), []).append(q)
    fresh = [q for q in joining if not states.get(q)]
    parts = [(fresh, None)] if fresh else []
    for qs in groups.values():
        parts.append((qs, [states[q] for q in qs]))
        resumed.update(qs)
    for qs, rows in parts:
        reqs, smps = [requests[q] for q in qs], [samples[q] for q in qs]
        new = (_prefill(model, reqs, smps, pad_id, stops, head_dtype) if rows is None
               else _resume(model, reqs, smps, rows, stops, head_dtype))
        if recorder is not None:
            routing = recorder.take()
            routing = routing.view(len(qs), -1, *routing.shape[1:])  # [requests, prefilled width, layers, k]
            for j, (r, group) in enumerate(zip(reqs, smps)):
                fed = len(r.prompt_ids) if rows is None else routing.shape[1]  # left padding is not the prompt's
                prompt = torch.cat([routing.new_full((len(r.prompt_ids) - fed, *routing.shape[2:]), -1),
                                    routing[j, routing.shape[1] - fed:]])
                for s in group:
                    s.routing.append(prompt)
        batch = _join(batch, new)
    return batch


def _keep_finished(batch: _Batch, requests: list[Request], kept: KeptStates) -> None:
    """Keep the state of each row that just finished and whose request names a session. It holds the
    prompt and every sampled token but the last (never fed to the model), without the row's padding."""
    for i, s in enumerate(batch.samples):
        session = requests[s.q].session
        if s.finish and session is not None:
            drop = batch.mask.shape[1] - int(batch.mask[i].sum())
            row = torch.tensor([i], device=batch.mask.device)
            kept.keep(session, requests[s.q].prompt_ids + s.tokens[:-1], batch.cache.take(row, drop))


@torch.no_grad()
def generate(model, requests: list[Request], pad_id: int, weight_version: int = 0,
             max_batch_rows: int = 256, decode=None, head_dtype: torch.dtype = torch.float32,
             kept: KeptStates | None = None, recorder: RoutingRecorder | None = None) -> list[Trajectory]:
    """Generate every request's n samples; returns trajectories in request order, then sample order,
    each token tagged `weight_version`.

    At most `max_batch_rows` sequences decode together (a request's samples are admitted together,
    since they share one prefill); queued requests join as rows finish. Sample s of a request with
    seed x draws its token at response position t from Philox(x; t, s) (rollout.sampling), so its
    output does not depend on the batch. The LM head runs in fp32 (M1 §3.2); `head_dtype=torch.bfloat16`
    is the pre-fix head, for experiments/fp32_head.py.

    With `kept`, a request that names a session keeps its state there when it finishes, and one whose
    prompt extends its session's kept tokens prefills only the rest; its trajectory's
    `outcomes["state_kept"]` is 1 then, 0 when it prefilled its whole prompt. With `recorder` (on this
    model), each trajectory's `routing` holds the experts of every token fed to the model: the prompt, at
    prefill, and each sampled token but the last, at decode (rollout.routing). Raises ValueError if a
    request has stop strings and no `decode` (token ids -> text) is given, or names a session with n != 1.
    """
    if decode is None and any(r.params.stop_strings for r in requests):
        raise ValueError("stop_strings need generate(..., decode=tokenizer.decode)")
    for q, r in enumerate(requests):
        if r.session is not None and r.n != 1:
            raise ValueError(f"request {q} names session {r.session} with n={r.n}; a session is one sequence (n=1)")
    samples = [[_Sample(q, s, r.params) for s in range(r.n)] for q, r in enumerate(requests)]
    stops = max([len(r.params.stop_token_ids) for r in requests], default=0)
    queue, batch, resumed = deque(range(len(requests))), None, set()
    while queue or batch:
        joining = _admit(queue, requests, len(batch.samples) if batch else 0, max_batch_rows)
        if joining:
            batch = _admit_rows(model, batch, joining, requests, samples, pad_id, stops, head_dtype, kept, resumed,
                                recorder)
        tokens, keep = _step(batch, decode)
        if kept is not None:
            _keep_finished(batch, requests, kept)
        batch = _leave(batch, keep)
        if batch:
            batch.mask = F.pad(batch.mask, (0, 1), value=1)
            batch.logits = decode_step(model, batch.cache, batch.mask, batch.next_pos,
                                       tokens[torch.tensor(keep, device=tokens.device)], head_dtype)
            batch.next_pos = batch.next_pos + 1
            if recorder is not None:
                for s, routing in zip(batch.samples, recorder.take().unsqueeze(1)):
                    s.routing.append(routing)
    out = [Trajectory.sampled(requests[s.q].prompt_ids, s.tokens, s.logprobs, s.finish, weight_version,
                              torch.cat(s.routing) if s.routing else None)
           for group in samples for s in group]
    for t, s in zip(out, (s for group in samples for s in group)):
        if requests[s.q].session is not None:
            t.outcomes["state_kept"] = int(s.q in resumed)
    return out


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


def _store_experts_transposed(model) -> None:
    """Store each [experts, out, in] expert weight of `model` in [experts, in, out] memory order, same shape
    and values, so that the weight grouped GEMMs read (its transpose) is contiguous.

    On the CPU, torch's grouped GEMM is slower over the non-contiguous transposed view of weights not in cache:
    this layout cut the experts of MiniMax `small` from 14.0 to 10.6 ms a step at 8 rows and a whole decode
    step's CPU time by 13% at 1 and 8 rows, 4% at 64 (same tokens, logits within 1e-6: another GEMM order).
    `load_state_dict` copies into the parameters in place, so weight updates keep the layout. Experts already
    stored [experts, in, out] (`is_transposed`) are left as they are, and so are weights on other devices: only
    the CPU was measured.
    """
    for module in model.modules():
        if getattr(module, "is_transposed", None) is False:  # set on every `use_experts_implementation` class
            for p in module.parameters(recurse=False):
                if p.dim() == 3 and p.device.type == "cpu":
                    p.data = p.data.mT.contiguous().mT


class CispoEngine(Engine):
    """This module's `generate` as an engine. It switches the model to the decode attention kernel and
    MoE experts to grouped GEMMs (on the CPU with their weights stored transposed in memory), and keeps
    the LM head in fp32 (M1 §3.2) whatever the body's dtype; on CUDA a MiniMax model's lightning attention
    runs fla's kernels (rollout.kernels), and so do Gated DeltaNet and KDA layers of a model from
    `build_model` or `load_model`.
    `head_dtype=torch.bfloat16` keeps the head in bf16 instead, as M1 had it before its fix; only
    experiments/fp32_head.py asks for it. `record_routing` records each token's experts in its trajectory
    (MoE routing replay, rollout.routing; a ValueError for a model it does not cover).
    """

    def __init__(self, model, config: RolloutConfig, pad_id: int, tokenizer=None,
                 head_dtype: torch.dtype = torch.float32, record_routing: bool = False):
        super().__init__(model, config, pad_id, tokenizer)
        self.recorder = RoutingRecorder(self.model) if record_routing else None
        use_decode_attention(self.model)
        self.head_dtype = head_dtype
        self.kept = KeptStates(config.max_kept_sessions)
        self.model.lm_head.to(head_dtype)  # its weights then arrive from load_weights in this dtype too
        if getattr(self.model.config, "_experts_implementation", None) == "eager":
            # One grouped GEMM per projection instead of a Python loop over experts with a host sync
            # (nonzero) in each MoE layer: 12% faster on the CPU benchmark, same tokens and logprobs.
            # Training keeps eager experts (grouped_mm's backward gave NaN, docs/notes.md#model); this is inference.
            self.model.config._experts_implementation = "grouped_mm"
            _store_experts_transposed(self.model)
        if self.model.lm_head.weight.is_cuda and self.model.config.model_type == "minimax":
            try:
                use_fla_lightning(self.model)
            except ImportError as e:
                print(f"warning: {e}; lightning attention stays on the torch path", flush=True)

    def generate(self, requests: list[Request]) -> list[Trajectory]:
        return generate(self.model, requests, self.pad_id, self.version, self.config.max_batch_rows,
                        decode=self._text if self.tokenizer is not None else None, head_dtype=self.head_dtype,
                        kept=self.kept if self.config.max_kept_sessions else None, recorder=self.recorder)

    def load_weights(self, state_dict: dict, version: int) -> None:
        super().load_weights(state_dict, version)
        self.kept.clear()  # computed by the old weights

    def _text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


