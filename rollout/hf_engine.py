"""transformers' `generate` as a rollout engine: the baseline our engine is measured against, and a
second implementation of the engine interface (rollout.engine.Engine documents it).

One `generate` call per request (its n samples as `num_return_sequences`), so no request waits for
another's budget but rows never share a batch across requests. Sampling uses HF's own logits
processors and torch's global generator seeded per request: reproducible for a request run alone,
but not the counter-based streams of our engine. Logprobs come from one teacher-forced forward of
prompt + response through the fp32 head, so they are what the trainer recomputes.
Not supported, with an error naming the request: stop strings and M1's repetition stop (HF's
stopping criteria do not express them without per-token Python of our own).
"""
from __future__ import annotations

import torch

from rollout.engine import Engine
from rollout.model import fp32_logits, new_cache
from rollout.trajectory import Request, Trajectory


class HFGenerateEngine(Engine):
    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[Trajectory]:
        for q, r in enumerate(requests):
            if r.params.stop_strings:
                raise ValueError(f"request {q}: the hf engine does not support stop_strings; use rollout.engine=cispo")
            if r.params.repetition_tokens <= r.params.max_new_tokens:
                raise ValueError(f"request {q}: the hf engine has no repetition stop (repetition_tokens="
                                 f"{r.params.repetition_tokens} <= max_new_tokens={r.params.max_new_tokens}); "
                                 f"raise rollout.repetition_tokens or use rollout.engine=cispo")
        return [t for r in requests for t in self._request(r)]

    def _request(self, r: Request) -> list[Trajectory]:
        p, device = r.params, self.model.lm_head.weight.device
        prompt = torch.tensor([r.prompt_ids], device=device)
        sampled = p.temperature > 0
        torch.manual_seed(r.seed)
        out = self.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=new_cache(self.model),
            max_new_tokens=p.max_new_tokens, do_sample=sampled, temperature=p.temperature if sampled else None,
            top_k=p.top_k if sampled else None, top_p=p.top_p if sampled else None, num_return_sequences=r.n,
            eos_token_id=list(p.stop_token_ids) or None, pad_token_id=self.pad_id)
        responses, reasons = [], []
        for row in out[:, prompt.shape[1]:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in p.stop_token_ids), None)
            responses.append(row[:end] if end else row)
            reasons.append("stop" if end else "length")
        logprobs = self._logprobs(r.prompt_ids, responses, p.temperature or 1.0)
        return [Trajectory.sampled(r.prompt_ids, ids, lp, reason, self.version)
                for ids, lp, reason in zip(responses, logprobs, reasons)]

    def _logprobs(self, prompt: list[int], responses: list[list[int]], temperature: float) -> list[list[float]]:
        """Teacher-forced fp32-head log π of each response token; responses right-padded (causal, so exact)."""
        width, device = max(map(len, responses)), self.model.lm_head.weight.device
        ids = torch.tensor([prompt + t + [self.pad_id] * (width - len(t)) for t in responses], device=device)
        hidden = self.model.model(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]
        logp = torch.log_softmax(fp32_logits(self.model, hidden) / temperature, -1)
        chosen = logp.gather(2, ids[:, len(prompt):, None]).squeeze(2).tolist()
        return [row[:len(t)] for row, t in zip(chosen, responses)]
