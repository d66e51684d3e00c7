"""vLLM as a rollout engine (`rollout.engine: vllm`), for the dense and MoE models it serves; install it with
the `vllm` extra (README, "Which engine"). The same code runs on vLLM's CPU build and on CUDA.

The engine keeps vLLM in this process, on one device, and returns for each sample the exact token ids,
the logprob of each sampled token after temperature (what the trainer recomputes), and the weight
version that sampled it. New weights are loaded in place (no restart); after each load one probe
sequence is scored by vLLM and by the HF model holding the same weights, and a gap beyond float noise
raises, so a reload that leaves vLLM's weights wrong (it did, for MoE experts on the CPU) fails loudly.

Semantics that vLLM does not offer directly are kept by truncating afterwards, which gives the same
tokens as stopping there (decoding is causal): stop strings and M1's repetition stop end a sample at
the first token that meets them, at the cost of the tokens generated past it. top-k and top-p are
refused: vLLM's logprobs then come from the filtered distribution, not the tempered one the trainer
computes. Sample s of a request with seed x is drawn by vLLM from seed x + s (its own fan-out of n), so
its tokens do not depend on the batch, but they are not our engine's Philox streams.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from rollout.config import RolloutConfig
from rollout.engine import Engine
from rollout.model import token_logprobs
from rollout.trajectory import Request, Trajectory

# Probe of the check after each weight load: this many tokens sampled from a fixed prompt.
_PROBE_TOKENS = 16


def _repack_cpu_experts(worker) -> None:
    """Runs in vLLM's worker after a reload. On the CPU, MoE experts compute from weights re-packed into a
    grouped-GEMM layout at start-up; vLLM 0.32's in-place reload writes the new experts in checkpoint layout
    and does not re-pack them, so the output is silently wrong (measured: mean |Δ logprob| 0.1 on a tiny
    Qwen3-MoE) until this re-packs them. CUDA kernels read the weights as loaded."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


class VLLMEngine(Engine):
    """One in-process vLLM `LLM` on the model's device, built from the HF model the worker loaded.

    `start_s` is the seconds vLLM took to start (RolloutWorker reports it in the metrics). Raises
    ImportError naming the extra if vLLM is not installed.
    """

    def __init__(self, model, config: RolloutConfig, pad_id: int, tokenizer=None):
        super().__init__(model, config, pad_id, tokenizer)
        # In-process, not vLLM's default engine-core process: start-up drops from ~19 s to a few seconds
        # here, and weights can be handed over without a second copy through a pipe.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' ({e})") from None
        cuda = model.lm_head.weight.is_cuda
        self._dir = None
        path = model.config._name_or_path
        if not (path and (Path(path) / "config.json").is_file()):  # built in memory: vLLM loads from a directory
            self._dir = tempfile.TemporaryDirectory(prefix="cispo-vllm-")
            model.save_pretrained(self._dir.name)
            path = self._dir.name
        c = model.config
        # A prompt of up to 2,048 tokens plus the budget: vLLM refuses a longer prompt by name.
        max_len = min(c.max_position_embeddings, config.max_new_tokens + 2048)
        # KV for every row at full length, so no request is ever preempted mid-sample (vLLM then recomputes it).
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize
        t0, set_num_threads = time.perf_counter(), torch.set_num_threads
        self.llm = LLM(
            path, skip_tokenizer_init=True, dtype=model.dtype, seed=0, max_model_len=max_len,
            max_num_seqs=config.max_batch_rows, kv_cache_memory_bytes=config.max_batch_rows * max_len * kv_bytes,
            # One device, this process: "uni" runs the worker here instead of in a Ray or mp worker of its own.
            distributed_executor_backend="uni",
            # The sampled token's logprob after temperature (the raw mode gives the untempered one).
            logprobs_mode="processed_logprobs",
            # A per-request seed with a prompt split over steps kills the engine on the CPU ("CPU
            # Generator does not use offset", then EngineDeadError): prefill each prompt whole.
            enable_chunked_prefill=False,
            # CPU: no torch.compile warm-up (~17 s per model here). CUDA: CUDA graphs, where they pay.
            enforce_eager=not cuda)
        self.start_s = time.perf_counter() - t0
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process, to keep its
        # thread binding; the rest of this process (tests, benchmarks, the worker) must keep its own setting.
        torch.set_num_threads = set_num_threads
        self._probe = [i % c.vocab_size for i in range(3, 11)]

    def generate(self, requests: list[Request]) -> list[Trajectory]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for q, r in enumerate(requests):
            if r.params.top_k or r.params.top_p < 1:
                raise ValueError(f"request {q}: rollout.engine=vllm does not support top_k/top_p (its logprobs are "
                                 f"then of the filtered distribution, not the trainer's); use rollout.engine=cispo")
        # One vLLM request per sample, seeded from (request seed, sample index): vLLM's own fan-out of n seeds
        # sample s with seed + s, which is sample 0 of the request seeded seed + s (the same random stream).
        # Samples of one prompt still share its prefill through vLLM's prefix cache.
        samples = [(r, s) for r in requests for s in range(r.n)]
        params = [SamplingParams(
            seed=(r.seed * 2**16 + s) % 2**63, temperature=r.params.temperature, max_tokens=r.params.max_new_tokens,
            stop_token_ids=list(r.params.stop_token_ids), ignore_eos=True,  # our stop ids include EOS, or not
            logprobs=0, detokenize=False) for r, s in samples]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r, _ in samples], params,
                                    use_tqdm=False)
        return [self._trajectory(r, out.outputs[0]) for (r, _), out in zip(samples, outputs)]

    def _trajectory(self, r: Request, out) -> Trajectory:
        tokens = list(out.token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.logprobs, tokens)]
        reason = "stop" if out.finish_reason == "stop" else "length"
        end = self._early_end(r, tokens, logprobs)
        if end is not None:
            tokens, logprobs, reason = tokens[:end[0]], logprobs[:end[0]], end[1]
        return Trajectory.sampled(r.prompt_ids, tokens, logprobs, reason, self.version)

    def _early_end(self, r: Request, tokens: list[int], logprobs: list[float]) -> tuple[int, str] | None:
        """(length, reason) of the first stop string or repetition stop in a finished sample, as our engine
        checks them after each token (rollout.engine); None if neither occurs."""
        p, run = r.params, 0
        longest = max(map(len, p.stop_strings), default=0)
        for i, lp in enumerate(logprobs):
            run = run + 1 if math.exp(lp) > p.repetition_prob else 0
            if longest and any(s in self._text(tokens[max(0, i + 1 - longest):i + 1]) for s in p.stop_strings):
                return i + 1, "stop"
            if run >= p.repetition_tokens:
                return i + 1, "repetition"
        return None

    def _text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer beside it")
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def load_weights(self, state_dict: dict, version: int) -> None:
        """Load `state_dict` (HF names) into vLLM in place and into the HF model, then check one probe
        sequence: RuntimeError naming the version and the gap if vLLM's logprobs are not the HF model's."""
        super().load_weights(state_dict, version)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.llm.collective_rpc(_repack_cpu_experts)
        # vLLM may keep state derived from the old weights (prefix-cache blocks): drop it.
        self.llm.reset_prefix_cache()
        gap = self.reference_gap()
        tolerance = 1e-3 if self.model.dtype == torch.float32 else 0.1
        if gap > tolerance:
            raise RuntimeError(f"vLLM's weights after loading version {version} disagree with the trainer's: "
                               f"mean |Δ logprob| {gap:.2e} > {tolerance:g} on a probe sequence")

    @torch.no_grad()
    def reference_gap(self) -> float:
        """Mean |vLLM logprob − HF fp32-head logprob| over a probe sample of `_PROBE_TOKENS` tokens."""
        from rollout.trajectory import SamplingParams

        params = SamplingParams(max_new_tokens=_PROBE_TOKENS, repetition_tokens=_PROBE_TOKENS + 1)
        [t] = self.generate([Request(self._probe, seed=0, params=params)])
        ids = torch.tensor([t.prompt_ids + t.response_ids], device=self.model.lm_head.weight.device)
        hidden = self.model.model(input_ids=ids).last_hidden_state[:, len(t.prompt_ids) - 1:-1]
        logp, _ = token_logprobs(hidden, self.model.lm_head.weight, ids[:, len(t.prompt_ids):])
        return float((logp.cpu()[0] - torch.tensor(t.logprobs)).abs().mean())

    def close(self) -> None:
        from vllm.distributed import cleanup_dist_env_and_memory

        self.llm = None
        gc.collect()
        cleanup_dist_env_and_memory()  # so that another LLM can start in this process
        if self._dir is not None:
            self._dir.cleanup()
        super().close()
