"""The GPU checks of issue 13, one JSON line each, in order of importance.

    python benchmarks/gpu_check.py                 # on a GPU: the probe's 306M-parameter hybrid, bf16
    python benchmarks/gpu_check.py --cpu           # small sizes on the CPU (~3 min on a quiet machine)
    python benchmarks/gpu_check.py --recipe        # also the tiny recipe end to end (runs `cispo train`)
    python benchmarks/gpu_check.py --only decode   # one check: logprobs | families | decode | engine | trainer | recipe

Checks (each catches its own failure and prints {"check": ..., "error": ...} instead):
- logprobs: engine logprobs on the device against a teacher-forced fp32 forward (target <= 1e-4), the
  sampler's tokens on the device against the CPU's for the same logits, and on CUDA fla's chunked and
  recurrent lightning kernels against the torch path.
- families: one line per Gated DeltaNet and KDA preset (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, Kimi Linear,
  Ling 2.5), fp32: the engine (fla's chunked prefill and recurrent decode on CUDA where fla is installed,
  `fla_layers` > 0) against the same weights on transformers' torch path (rollout.kernels), with prompts
  across fla's 64-token chunks, forks and joins: max |Δ logprob| (target <= 1e-4) and greedy tokens
  equal to HF `generate`'s. On the CPU both sides run the torch path (a dry run of the check).
- decode: ms per decode step against rows (1, 8, 64, 256) and context (1k, 8k, 32k), for the hybrid
  and an all-softmax model of the same shape, beside the bandwidth floor: bytes a step must read
  (weights of the experts the rows can reach, the fp32 head, softmax KV, linear states read and
  written) over the peak bandwidth (`--peak-gbs`). Targets: <= 2 ms at 64 rows and 32k; the hybrid's
  32k within 1.2x of its 1k.
- engine: our engine against HF `generate` on long-tailed budgets (benchmarks/rollout_throughput.py's
  setup: 8 prompts x 8 samples, log-normal budgets in [32, 1024]). Target >= 5x.
- trainer: the DeepSpeed trainer group (cispo.trainer.TrainerGroup.train) tokens/s for fp32 and bf16 on
  one long-tailed batch (median response 512 tokens; --cpu: 64), with model FLOPs
  utilization 6 · active parameters · tokens/s over `--peak-tflops` (bf16 dense). Target bf16 >= 1.5x fp32.
- recipe (only with --recipe): `cispo train recipes/tiny-arith.yaml` with rollout and trainer on one GPU.

On the GPU test machine (../shared/gpu/README.md): fill .whl/ with fetch-wheels.sh plus
`pip download --no-deps -d .whl fla-core==0.6.0 einops` (both pure Python; Triton is there), send
.whl/ and a copy of ray_inprocess/, then run
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
`PYTHONPATH=RAY_INPROCESS_COPY:/tmp/site:$PWD python3 benchmarks/gpu_check.py --recipe`.
The stand-in has no `ray.get_gpu_ids`; RolloutWorker then takes every visible GPU as its own.

The model: hidden 1024, 8 layers in M1's 7:1 layout, 16 heads of 64 (2 KV heads), 8 experts top-2 of
width 1024, a 32k vocabulary (--cpu: the "small" preset with a 4k vocabulary, shorter contexts).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from decode_scaling import per_step_seconds
from rollout_throughput import budgets, run_engine, run_hf
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.kernels import use_delta_rule_kernels
from rollout.trajectory import Request, SamplingParams
from rollout.model import build_hybrid, build_model, fp32_logits
from rollout.sampling import sample, uniforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2, block_size=256)


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields}), flush=True)


def probe_model(args, softmax_only: bool = False, dtype=None):
    torch.manual_seed(0)
    shape = {} if args.cpu else PROBE
    if softmax_only:
        shape = {**shape, "layer_types": ["full_attention"] * 8}
    model = build_hybrid("small" if args.cpu else "tiny", args.vocab, **shape).eval()
    return model.to(args.device, dtype or args.dtype)


def check_logprobs(args) -> None:
    model = probe_model(args, dtype=torch.float32)
    engine = CispoEngine(model, RolloutConfig(), pad_id=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, args.vocab, (n,), generator=g).tolist() for n in (5, 40, 300)]
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95)
    out = engine.generate([Request(p, n=2, seed=i, params=params) for i, p in enumerate(prompts)])
    reference = probe_model(args, dtype=torch.float32)  # same seed, same weights, the unpatched torch path
    worst = _logprob_gap(reference, out, 0.8, args.device)
    with torch.no_grad():
        rows = 4096
        logits = torch.randn(rows, args.vocab, generator=g)
        keys, index, pos = torch.randint(0, 2**32, (rows, 2), generator=g), torch.arange(rows) % 8, torch.arange(rows)
        t, k, p = torch.rand(rows) + 0.1, torch.randint(0, 50, (rows,), generator=g), torch.rand(rows) * 0.5 + 0.5
        on_cpu, _ = sample(logits, uniforms(keys, index, pos), t, k, p, torch.arange(rows))
        dev = lambda x: x.to(args.device)
        on_device, _ = sample(dev(logits), uniforms(dev(keys), dev(index), dev(pos)), dev(t), dev(k), dev(p),
                              dev(torch.arange(rows)))
        result = {"max_abs_logprob_gap": worst, "target": 1e-4, "completions": len(out),
                  "sampler_rows_equal_to_cpu": int((on_device.cpu() == on_cpu).sum()), "sampler_rows": rows}
        if args.device.type == "cuda":
            result.update(_fla_gaps(args, prompts[2]))
    emit("logprobs", device=str(args.device), **result)


def _logprob_gap(reference, completions, temperature: float, device) -> float:
    """Max |Δ logprob| of `completions` against a teacher-forced fp32 forward of `reference`, one per completion."""
    worst = 0.0
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([c.prompt_ids + c.response_ids], device=device)
            hidden = reference.model(input_ids=ids).last_hidden_state[0, len(c.prompt_ids) - 1:-1]
            logp = torch.log_softmax(fp32_logits(reference, hidden) / temperature, -1)
            expected = logp.gather(1, torch.tensor(c.response_ids, device=device)[:, None])[:, 0].cpu()
            worst = max(worst, float((expected - torch.tensor(c.logprobs)).abs().max()))
    return worst


FLA_PRESETS = ("tiny-qwen3_5", "tiny-qwen3_5_moe", "tiny-qwen3_next", "tiny-kimi_linear", "tiny-bailing_hybrid")


def check_families(args) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, args.vocab, (n,), generator=g).tolist() for n in (5, 40, 150, 300)]
    sampled = [Request(p, n=2, seed=i, params=SamplingParams(max_new_tokens=b, temperature=0.8))
               for i, (p, b) in enumerate(zip(prompts, (48, 8, 24, 16)))]
    greedy = [Request(p, params=SamplingParams(max_new_tokens=16, temperature=0)) for p in prompts]
    for preset in FLA_PRESETS:
        models = []
        for _ in range(2):  # the same seed, the same weights
            torch.manual_seed(0)
            models.append(build_model(preset, args.vocab, pad_token_id=0).eval().to(args.device))
        model, reference = models
        fla_layers = use_delta_rule_kernels(model)  # fla on CUDA tensors where fla imports
        use_delta_rule_kernels(reference, "none")
        # 4 rows at once: the later requests join rows left by finished ones
        engine = CispoEngine(model, RolloutConfig(max_batch_rows=4), pad_id=0)
        gap = _logprob_gap(reference, engine.generate(sampled), 0.8, args.device)
        equal = 0
        for r, c in zip(greedy, engine.generate(greedy)):
            ids = torch.tensor([r.prompt_ids], device=args.device)
            hf = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)
            equal += c.response_ids == hf[0, len(r.prompt_ids):].tolist()
        emit("families", preset=preset, device=str(args.device),
             kernels="fla" if fla_layers and args.device.type == "cuda" else "torch", fla_layers=fla_layers,
             max_abs_logprob_gap=gap, target=1e-4, greedy_equal_to_hf=equal, greedy_prompts=len(greedy))


def _fla_gaps(args, prompt: list[int]) -> dict:
    """fla's chunked prefill and recurrent decode against the torch path: max |Δ hidden|, fp32."""
    from rollout.kernels import use_fla_lightning
    from rollout.model import new_cache

    torch_path, fla_path = probe_model(args, dtype=torch.float32), probe_model(args, dtype=torch.float32)
    use_fla_lightning(fla_path)
    ids = torch.tensor([prompt], device=args.device)
    gaps = {}
    for name, model in (("torch", torch_path), ("fla", fla_path)):
        cache = new_cache(model)
        prefill = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        step = model.model(input_ids=ids[:, :1], position_ids=torch.tensor([[len(prompt)]], device=args.device),
                           cache=cache, use_cache=True).last_hidden_state
        gaps[name] = (prefill, step)
    return {"fla_chunk_prefill_max_abs": float((gaps["fla"][0] - gaps["torch"][0]).abs().max()),
            "fla_recurrent_decode_max_abs": float((gaps["fla"][1] - gaps["torch"][1]).abs().max())}


def _floor_ms(model, rows: int, context: int, peak_gbs: float) -> float:
    """Bytes one decode step must move at least, over the peak bandwidth, in ms."""
    c = model.config
    size = lambda params: sum(p.numel() * p.element_size() for p in params)
    experts = [m for m in model.modules() if type(m).__name__ == "MiniMaxExperts"]
    expert_bytes = size(p for m in experts for p in m.parameters())
    reachable = min(1.0, rows * c.num_experts_per_tok / c.num_local_experts)  # experts the rows can touch
    dense = size(model.parameters()) - expert_bytes - size(model.model.embed_tokens.parameters())
    head = model.lm_head.weight.numel() * 4  # read as fp32
    element = next(model.parameters()).element_size()
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    softmax = sum(t == "full_attention" for t in c.layer_types)
    kv = softmax * rows * context * 2 * c.num_key_value_heads * head_dim * element
    linear = (len(c.layer_types) - softmax) * rows * c.num_attention_heads * head_dim ** 2 * 4 * 2
    return (dense - model.lm_head.weight.numel() * element + head + reachable * expert_bytes + kv + linear) \
        / (peak_gbs * 1e9) * 1e3


def check_decode(args) -> None:
    for kind in ("hybrid", "softmax"):
        model = probe_model(args, softmax_only=kind == "softmax")
        CispoEngine(model, RolloutConfig(), pad_id=0)  # as a worker runs it: decode attention, fp32 head, fla
        cells = {}
        for context in args.contexts:
            for rows in args.rows:
                seconds, mib = per_step_seconds(model, context, args.steps, rows)
                cells[f"{rows}x{context}"] = {"ms": round(seconds * 1e3, 3), "state_mib": round(mib, 1),
                                                      "floor_ms": round(_floor_ms(model, rows, context, args.peak_gbs), 3)}
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
        first, last = f"{args.rows[-1]}x{args.contexts[0]}", f"{args.rows[-1]}x{args.contexts[-1]}"
        emit("decode", model=kind, dtype=str(args.dtype), peak_gbs=args.peak_gbs, cells=cells,
             ratio_longest_over_shortest_context=round(cells[last]["ms"] / cells[first]["ms"], 2))
        del model


def check_engine(args) -> None:
    model = probe_model(args)
    model.generation_config.eos_token_id = None
    engine = CispoEngine(probe_model(args), RolloutConfig(), pad_id=0)
    engine.load_weights(model.state_dict(), 0)
    lengths = budgets(0)
    prompts = torch.randint(4, args.vocab, (8, 32), generator=torch.Generator().manual_seed(1)).tolist()
    runs = [(run_engine(engine, prompts, lengths)[0], run_hf(model, prompts, lengths)[0]) for _ in range(args.repeats)]
    engine_s, hf_s = (statistics.median(r) for r in zip(*runs))
    useful = 8 * sum(lengths)
    emit("engine", budgets=lengths, useful_tokens=useful, engine_median_s=round(engine_s, 3),
         hf_median_s=round(hf_s, 3), engine_tokens_per_s=round(useful / engine_s, 1),
         hf_tokens_per_s=round(useful / hf_s, 1), speedup=round(hf_s / engine_s, 2), target_speedup=5.0)


def check_trainer(args) -> None:
    import ray

    from cispo.batching import pad_rows
    from cispo.config import load_recipe
    from cispo.trainer import TrainerGroup
    from rollout.model import build_char_tokenizer, save_model

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, num_cpus=4, num_gpus=1 if args.device.type == "cuda" else 0,
                 log_to_driver=False)
    tok = build_char_tokenizer("".join(chr(c) for c in range(0x4E00, 0x4E00 + args.vocab - 4)))
    model = probe_model(args, dtype=torch.float32).cpu()
    active = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    experts = sum(p.numel() for m in model.modules() if type(m).__name__ == "MiniMaxExperts" for p in m.parameters())
    active -= experts * (1 - model.config.num_experts_per_tok / model.config.num_local_experts)
    model_dir = tempfile.mkdtemp(prefix="gpu-check-")
    save_model(model, tok, model_dir)
    # Log-normal response lengths (median 512) after a 64-token prompt, groups of 8, random advantages.
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.log(torch.tensor(512.0 if args.device.type == "cuda" else 64.0))
                        + torch.randn(args.train_rows, generator=g)).clamp(16, 4096).int()
    batch = pad_rows([(torch.randint(4, args.vocab, (64,), generator=g).tolist(),
                       torch.randint(4, args.vocab, (int(n),), generator=g).tolist()) for n in lengths], filler_id=2)
    batch.old_logprobs = torch.full_like(batch.loss_mask, -8.0) * batch.loss_mask
    batch.advantages, batch.group_index = torch.randn(args.train_rows, generator=g), torch.arange(args.train_rows) // 8
    tokens = int(batch.lengths.sum())
    gpu = ["resources.trainer.gpus=1"] if args.device.type == "cuda" else []
    result = {}
    for precision in ("fp32", "bf16"):
        overrides = ["algorithm.updates_per_batch=1", "optim.lr=1e-6", *gpu,
                     *(["trainer.deepspeed={bf16: {enabled: true}}"] if precision == "bf16" else [])]
        trainers = TrainerGroup.start(load_recipe(os.path.join(REPO, "recipes/tiny-arith.yaml"), overrides), model_dir)
        try:
            trainers.train(batch, 0)  # warm-up
            seconds = []
            for step in range(args.repeats):
                t0 = time.perf_counter()
                trainers.train(batch, step + 1)
                seconds.append(time.perf_counter() - t0)
        finally:
            trainers.shutdown()
        rate = tokens / statistics.median(seconds)
        result[precision] = {"tokens_per_s": round(rate, 1),
                             "mfu": round(6 * active * rate / (args.peak_tflops * 1e12), 4) if args.peak_tflops else None}
    emit("trainer", rows=args.train_rows, tokens=tokens, active_params=int(active), peak_tflops=args.peak_tflops,
         **result, bf16_over_fp32=round(result["bf16"]["tokens_per_s"] / result["fp32"]["tokens_per_s"], 2), target=1.5)


def check_recipe(args) -> None:
    run_dir = tempfile.mkdtemp(prefix="gpu-check-recipe-")
    gpus = ["resources.trainer.gpus=1"] if args.device.type == "cuda" else []  # the replica lives in rank 0 (colocate)
    cmd = [sys.executable, "-m", "cispo.cli", "train", "recipes/tiny-arith.yaml", f"run.dir={run_dir}",
           "run.max_steps=3", *gpus]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.recipe_timeout)
    rows = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines() if done.returncode == 0 else []
    emit("recipe", returncode=done.returncode, seconds=round(time.perf_counter() - t0, 1), steps=len(rows),
         last_metrics=json.loads(rows[-1]) if rows else None, stderr_tail=done.stderr[-800:])


CHECKS = {"logprobs": check_logprobs, "families": check_families, "decode": check_decode, "engine": check_engine,
          "trainer": check_trainer, "recipe": check_recipe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="small sizes on the CPU")
    ap.add_argument("--recipe", action="store_true", help="also run the tiny recipe end to end")
    ap.add_argument("--only", choices=list(CHECKS), help="run this check alone")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth for the floor (H200: 4800)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (H200: 989)")
    ap.add_argument("--recipe-timeout", type=int, default=900)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    args.device = torch.device("cuda" if cuda else "cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.vocab = 32_768 if cuda else 4096
    args.rows = [1, 8, 64, 256] if cuda else [1, 8]
    args.contexts = [1024, 8192, 32768] if cuda else [256, 1024]
    args.steps = 20 if cuda else 4
    args.train_rows = 128 if cuda else 16
    args.repeats = args.repeats or (3 if cuda else 1)
    args.peak_gbs = args.peak_gbs or (4800.0 if cuda else 20.0)
    args.peak_tflops = args.peak_tflops or (989.0 if cuda else None)
    if args.cpu:
        torch.set_num_threads(1)
    emit("device", device=str(args.device), name=torch.cuda.get_device_name() if cuda else "cpu",
         torch=torch.__version__, dtype=str(args.dtype))
    names = [args.only] if args.only else [n for n in CHECKS if n != "recipe" or args.recipe]
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name](args)
        except Exception as e:  # one failing check must not hide the others' figures
            emit(name, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-1500:])
        emit("timing", of=name, seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
