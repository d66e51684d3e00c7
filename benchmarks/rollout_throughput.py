"""Rollout throughput: our engine vs transformers' `model.generate` on long-tailed budgets.

8 prompts x 8 samples on each model of `--models`: by default MiniMax's `small` preset (hidden 256,
8 layers, M1's 7:1 lightning layout) and `tiny-qwen3_5` (Gated DeltaNet, hidden 64, 3:1). Each
request's `max_new_tokens` is drawn log-normal and clipped to [32, 1024]; the model has no EOS,
so every sequence runs to its budget. HF is used as a user would: one batch of 64 rows
(`num_return_sequences=8`) run to the longest budget, each row then truncated to its own budget.
HF gets our fixed cache (`past_key_values=new_cache(model)`), which gives correct outputs for
left-padded batches (docs/notes.md#model). Our engine runs as a worker runs it (`CispoEngine`: decode
attention, fp32 head) on a copy of the same weights. Useful tokens are the budgets' sum, the same for both.

    python benchmarks/rollout_throughput.py [--repeats 3] [--threads 1] [--models small tiny-qwen3_5]
                                            [--prompts 8] [--max-rows 64]

Prints one JSON line: per model, median seconds and useful tokens/s for each engine, and the speed-up, in wall
time and in CPU seconds of the process (on a loaded machine, wall time mostly measures the other processes).
`--prompts 32 --max-rows 64` is an RL step with more prompts than fit at once: our engine decodes at most 64
rows (queued prompts join as rows finish), HF runs batches of 64 rows (8 prompts), each to its longest budget.

    python benchmarks/rollout_throughput.py --dense [--models llama-1m llama-20m] [--repeats 3] [--threads 1]

instead runs the three engines on tiny random Llama models of about 1M and 20M parameters (vLLM serves
no MiniMax hybrid): our engine, HF generate as above and vLLM (`VLLMEngine`, in-process, fp32), the same
requests for each, alternated. One JSON line per size: median seconds, useful tokens/s, vLLM's start-up
seconds (not in its median) and each engine's speed over HF generate's.

    python benchmarks/rollout_throughput.py --llamacpp [--models small] [--new-tokens 128] [--repeats 3] [--threads 2]

instead runs our engine and llama.cpp (its own `minimax-01` graph, on a GGUF export of the same weights:
rollout.llamacpp, the `llamacpp` extra) greedily on 8 and on 64 sequences decoding together, each a distinct
32-token prompt with the same budget, alternated. One JSON line per model: per row count, median seconds,
useful tokens/s for each, our speed over llama.cpp's (in wall and in CPU seconds), and how many sequences' greedy tokens agree (where
they part, the two logits were within float noise of a tie: tests/rollout/test_llamacpp.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import build_model, new_cache
from rollout.trajectory import Request, SamplingParams

VOCAB, PROMPTS, SAMPLES, PROMPT_LEN = 4096, 8, 8, 32


def budgets(seed: int, prompts: int = PROMPTS) -> list[int]:
    """Long-tailed budgets: log-normal (median 128, sigma 1) clipped to [32, 1024]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.log(torch.tensor(128.0)) + torch.randn(prompts, generator=g))
    return [int(b) for b in draws.clamp(32, 1024)]


def run_engine(engine, prompts, lengths) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for the engine to generate every request."""
    requests = [Request(p, n=SAMPLES, seed=i, params=SamplingParams(max_new_tokens=b, temperature=1.0))
                for i, (p, b) in enumerate(zip(prompts, lengths))]
    t0, c0 = time.perf_counter(), time.process_time()
    out = engine.generate(requests)
    assert [len(c.response_ids) for c in out] == [b for b in lengths for _ in range(SAMPLES)]
    return time.perf_counter() - t0, time.process_time() - c0


def run_hf(model, prompts, lengths, batch_rows: int = PROMPTS * SAMPLES) -> tuple[float, float]:
    """(wall, CPU seconds) for HF generate, in batches of `batch_rows` rows, each run to its longest budget."""
    step = batch_rows // SAMPLES
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), step):
        ids, part = torch.tensor(prompts[i:i + step]), lengths[i:i + step]  # equal lengths: no padding needed
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=new_cache(model),
                             max_new_tokens=max(part), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=SAMPLES, eos_token_id=None, pad_token_id=0)
        responses = [row[PROMPT_LEN:PROMPT_LEN + part[j // SAMPLES]] for j, row in enumerate(out.tolist())]
        assert [len(r) for r in responses] == [b for b in part for _ in range(SAMPLES)]
    return time.perf_counter() - t0, time.process_time() - c0


# Llama shapes (head size 32: vLLM's CPU attention takes 32 and up) of about 1M and 20M parameters.
DENSE = {"llama-1m": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=3,
                          num_key_value_heads=1),
         "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=12,
                           num_key_value_heads=4)}


def dense(args) -> None:
    """Ours, HF generate and vLLM side by side on each DENSE model; one JSON line per model."""
    # vLLM logs to stdout, where the JSON lines go; unconfigured, its warnings reach stderr only.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from rollout.vllm_engine import VLLMEngine

    # vLLM drops the process to one torch thread at start-up unless OMP_NUM_THREADS is set: keep --threads.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    lengths = budgets(args.seed)
    prompts = torch.randint(4, VOCAB, (PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    useful = SAMPLES * sum(lengths)
    for name in args.models:
        shape = DENSE[name]
        def make():  # a config each: engines set attributes on their model's config
            return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048,
                                                tie_word_embeddings=False, **shape)).eval()

        torch.manual_seed(args.seed)
        model = make()
        model.generation_config.eos_token_id = None
        ours = CispoEngine(make(), RolloutConfig(), pad_id=0)
        ours.load_weights(model.state_dict(), 0)
        vllm = VLLMEngine(make(), RolloutConfig(max_batch_rows=PROMPTS * SAMPLES), 0)
        vllm.load_weights(model.state_dict(), 0)
        runs = [(run_engine(ours, prompts, lengths)[0], run_hf(model, prompts, lengths)[0],
                 run_engine(vllm, prompts, lengths)[0]) for _ in range(args.repeats)]
        ours_s, hf_s, vllm_s = (statistics.median(r) for r in zip(*runs))
        print(json.dumps({
            "benchmark": "rollout_throughput_dense", "model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": VOCAB, "requests": f"{PROMPTS}x{SAMPLES}", "useful_tokens": useful, "repeats": args.repeats,
            "threads": args.threads, "engine_median_s": round(ours_s, 2), "hf_median_s": round(hf_s, 2),
            "vllm_median_s": round(vllm_s, 2), "vllm_start_s": round(vllm.start_s, 1),
            "engine_tokens_per_s": round(useful / ours_s, 1), "hf_tokens_per_s": round(useful / hf_s, 1),
            "vllm_tokens_per_s": round(useful / vllm_s, 1), "engine_speedup_vs_hf": round(hf_s / ours_s, 2),
            "vllm_speedup_vs_hf": round(hf_s / vllm_s, 2), "vllm_speedup_vs_engine": round(ours_s / vllm_s, 2)}),
            flush=True)
        vllm.close()


def llamacpp(args) -> None:
    """Ours and llama.cpp, greedy, on 8 and 64 parallel sequences of each MiniMax preset; one JSON line each."""
    from rollout.llamacpp import LlamaCpp, write_gguf

    for preset in args.models:
        torch.manual_seed(args.seed)
        model = build_model(preset, VOCAB).eval()
        engine = CispoEngine(build_model(preset, VOCAB).eval(), RolloutConfig(), pad_id=0)
        engine.load_weights(model.state_dict(), 0)
        result = {"benchmark": "rollout_throughput_llamacpp", "model": preset, "vocab": VOCAB, "prompt_len": PROMPT_LEN,
                  "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads, "decoding": "greedy"}
        with tempfile.TemporaryDirectory() as tmp:
            write_gguf(model, f"{tmp}/model.gguf")
            for rows in (8, 64):
                prompts = torch.randint(4, VOCAB, (rows, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
                requests = [Request(p, seed=i, params=SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0))
                            for i, p in enumerate(prompts)]
                lc = LlamaCpp(f"{tmp}/model.gguf", rows, PROMPT_LEN + args.new_tokens, args.threads, rows * PROMPT_LEN)
                # Wall and CPU seconds (all threads of this process): on a loaded machine, wall time mostly
                # measures the other processes, CPU time the work each engine did.
                times = []
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    ours = [c.response_ids for c in engine.generate(requests)]
                    t1, c1 = time.perf_counter(), time.process_time()
                    theirs = lc.greedy(prompts, [args.new_tokens] * rows)
                    times.append((t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1))
                lc.close()
                ours_s, lc_s, ours_cpu, lc_cpu = (statistics.median(t) for t in zip(*times))
                useful = rows * args.new_tokens
                result.update({f"rows{rows}_engine_median_s": round(ours_s, 2), f"rows{rows}_llamacpp_median_s": round(lc_s, 2),
                               f"rows{rows}_engine_tokens_per_s": round(useful / ours_s, 1),
                               f"rows{rows}_llamacpp_tokens_per_s": round(useful / lc_s, 1),
                               f"rows{rows}_speedup_vs_llamacpp": round(lc_s / ours_s, 2),
                               f"rows{rows}_engine_cpu_s": round(ours_cpu, 2), f"rows{rows}_llamacpp_cpu_s": round(lc_cpu, 2),
                               f"rows{rows}_cpu_speedup_vs_llamacpp": round(lc_cpu / ours_cpu, 2),
                               f"rows{rows}_sequences_agreeing": sum(a == b for a, b in zip(ours, theirs))})
        print(json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", action="store_true", help="ours, HF and vLLM on ~1M and ~20M Llama models")
    ap.add_argument("--llamacpp", action="store_true", help="ours and llama.cpp, greedy, on 8 and 64 sequences")
    ap.add_argument("--new-tokens", type=int, default=128, help="with --llamacpp: each sequence's budget")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="prompts (of 8 samples each) in the long-tailed run")
    ap.add_argument("--max-rows", type=int, default=PROMPTS * SAMPLES, help="rows decoding at once: our engine's "
                    "max_batch_rows, and HF's batch (it runs the prompts in batches of this many rows)")
    ap.add_argument("--models", nargs="+", metavar="MODEL",
                    help="model presets (rollout.config.PRESETS), each timed on its own random weights; with "
                         f"--dense, names from {sorted(DENSE)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.dense:
        args.models = args.models or list(DENSE)
        return dense(args)
    if args.llamacpp:
        args.models = args.models or ["small"]
        return llamacpp(args)
    args.models = args.models or ["small", "tiny-qwen3_5"]
    lengths = budgets(args.seed, args.prompts)
    prompts = torch.randint(4, VOCAB, (args.prompts, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    useful = SAMPLES * sum(lengths)
    step = args.max_rows // SAMPLES
    hf_generated = sum(SAMPLES * len(lengths[i:i + step]) * max(lengths[i:i + step]) for i in range(0, len(lengths), step))
    result = {"benchmark": "rollout_throughput", "vocab": VOCAB, "requests": f"{args.prompts}x{SAMPLES}",
              "max_rows": args.max_rows, "budgets": lengths, "useful_tokens": useful, "hf_generated_tokens": hf_generated,
              "repeats": args.repeats, "threads": args.threads, "hf_cache": "cache=new_cache(model)"}
    for preset in args.models:
        torch.manual_seed(args.seed)
        model = build_model(preset, VOCAB).eval()
        model.generation_config.eos_token_id = None
        # The engine as a rollout worker runs it (decode attention, fp32 head) on a copy of the same weights;
        # HF keeps SDPA, its default. Alternate the two, so that load from other processes hits both alike.
        engine = CispoEngine(build_model(preset, VOCAB).eval(), RolloutConfig(max_batch_rows=args.max_rows), pad_id=0)
        engine.load_weights(model.state_dict(), 0)
        runs = [(*run_engine(engine, prompts, lengths), *run_hf(model, prompts, lengths, args.max_rows))
                for _ in range(args.repeats)]
        # Wall and CPU seconds: on a loaded machine, wall time mostly measures the other processes.
        engine_s, engine_cpu, hf_s, hf_cpu = (statistics.median(r) for r in zip(*runs))
        result.update({f"{preset}_engine_median_s": round(engine_s, 2), f"{preset}_hf_median_s": round(hf_s, 2),
                       f"{preset}_engine_tokens_per_s": round(useful / engine_s, 1),
                       f"{preset}_hf_tokens_per_s": round(useful / hf_s, 1),
                       f"{preset}_speedup": round(hf_s / engine_s, 2), f"{preset}_engine_cpu_s": round(engine_cpu, 2),
                       f"{preset}_hf_cpu_s": round(hf_cpu, 2), f"{preset}_cpu_speedup": round(hf_cpu / engine_cpu, 2)})
    result["target_speedup"] = 2.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
