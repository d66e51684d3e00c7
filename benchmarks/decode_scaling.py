"""Per-token decode time vs context: the hybrid model (M1's 7:1 layout) vs an all-softmax model.

Both are the "small" preset (hidden 256, 8 layers, 8 heads of 32); the softmax model sets
`layer_types=["full_attention"] * 8`. `--kv-heads` sets grouped-query attention for both; the
default, 1, is M1's ratio (64 query heads share 8 KV heads). A softmax layer's decode step reads
its whole KV, so KV heads set how fast the hybrid's one softmax layer in eight grows with context.
`--attention` picks the softmax layers' kernel: `decode` (what the rollout workers use) or SDPA.

Each context is reached synthetically: the cache is filled with random keys/values and linear
states of the right shapes (a decode step's cost does not depend on their values; really
prefilling 32k tokens into the softmax model would take minutes here). Then one sequence decodes
through the engine's decode step; the median per-token time is reported, with the sequence's
state memory (linear states + KV).

    python benchmarks/decode_scaling.py [--steps 16] [--threads 1] [--kv-heads 1] [--attention decode|sdpa]
        [--families tiny-qwen3_5 tiny-kimi_linear tiny-nemotron_h]

`--families` adds tiny presets of other linear-state families (hidden 64), each beside its twin with
every linear layer made softmax; their linear layers run transformers' torch path.

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rollout.engine import decode_step
from rollout.config import PRESETS
from rollout.model import build_hybrid, build_model, new_cache, use_decode_attention
from rollout.states import KVSlot, RecurrentSlot

CONTEXTS, VOCAB = (1024, 8192, 32768), 4096


def cache_at_context(model, rows: int, context: int):
    """A cache of `rows` sequences holding `context` positions of random state, on the model's device."""
    device, dtype = model.lm_head.weight.device, model.get_input_embeddings().weight.dtype
    cache = new_cache(model)
    model.model(input_ids=torch.full((rows, 1), 5, device=device), cache=cache, use_cache=True)
    for slot in cache.layers:
        if isinstance(slot, RecurrentSlot):  # matrix and conv states: their values do not change the cost
            for states in (slot.conv_states, slot.recurrent_states):
                states.update({i: torch.randn_like(t) * 0.01 for i, t in states.items() if t is not None})
        elif isinstance(slot, KVSlot):
            shape = (*slot.keys.shape[:2], context, slot.keys.shape[-1])
            slot.set(torch.randn(shape, device=device, dtype=dtype),
                     torch.randn((*shape[:3], slot.values.shape[-1]), device=device, dtype=dtype))
    return cache


def state_mib(cache) -> float:
    tensors = [t for slot in cache.layers if isinstance(slot, RecurrentSlot)
               for t in (*slot.conv_states.values(), *slot.recurrent_states.values()) if t is not None]
    tensors += [t for slot in cache.layers if isinstance(slot, KVSlot) for t in (slot.keys, slot.values)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@torch.no_grad()
def per_step_seconds(model, context: int, steps: int, rows: int = 1) -> tuple[float, float]:
    """Median seconds of one decode step of `rows` sequences at `context`, and their state in MiB."""
    cache = cache_at_context(model, rows, context)
    memory, device = state_mib(cache), model.lm_head.weight.device
    mask = torch.ones((rows, context), dtype=torch.long, device=device)
    tokens, positions = torch.full((rows,), 5, device=device), torch.full((rows,), context, device=device)
    times = []
    for step in range(steps + 3):  # 3 warm-up steps
        mask = torch.nn.functional.pad(mask, (0, 1), value=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = decode_step(model, cache, mask, positions + step, tokens).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]), memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--attention", choices=["decode", "sdpa"], default="decode",
                    help="softmax layers' kernel: rollout.model's decode attention (the workers') or SDPA")
    ap.add_argument("--families", nargs="*", default=[], metavar="PRESET",
                    help="also time these tiny family presets (e.g. tiny-qwen3_5 tiny-kimi_linear tiny-nemotron_h), "
                         "each beside its all-softmax twin")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(num_key_value_heads=args.kv_heads)
    models = {"hybrid": build_hybrid("small", VOCAB, **shape).eval(),
              "softmax": build_hybrid("small", VOCAB, layer_types=["full_attention"] * 8, **shape).eval()}
    for preset in args.families:
        models[preset] = build_model(preset, VOCAB).eval()
        key = "layers_block_type" if "layers_block_type" in PRESETS[preset] else "layer_types"
        softmax = ["full_attention" if t == "linear_attention" else t for t in PRESETS[preset][key]]
        models[f"{preset}-softmax"] = build_model(preset, VOCAB, **{key: softmax}).eval()
    if args.attention == "decode":
        for model in models.values():
            use_decode_attention(model)
    result = {"benchmark": "decode_scaling", "model": "small (hidden 256, 8 layers, 8 heads)",
              "kv_heads": args.kv_heads, "attention": args.attention, "vocab": VOCAB,
              "steps": args.steps, "threads": args.threads, "state": "synthetic (random KV and linear states)"}
    for name, model in models.items():
        seconds, memory = zip(*(per_step_seconds(model, c, args.steps) for c in CONTEXTS))
        for c, s, m in zip(CONTEXTS, seconds, memory):
            result[f"{name}_ms_per_token_{c // 1024}k"] = round(s * 1e3, 2)
            result[f"{name}_state_mib_{c // 1024}k"] = round(m, 2)
        result[f"{name}_ratio_32k_over_1k"] = round(seconds[-1] / seconds[0], 2)
    result["target_hybrid_ratio"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
