"""Per-token decode time vs context: the hybrid model (M1's 7:1 layout) vs an all-softmax model.

Both are the "small" preset (hidden 256, 8 layers, 8 heads of 32); the softmax model sets
`layer_types=["full_attention"] * 8`. `--kv-heads` sets grouped-query attention for both; the
default, 1, is M1's ratio (64 query heads share 8 KV heads). A softmax layer's decode step reads
its whole KV, so KV heads set how fast the hybrid's one softmax layer in eight grows with context.
`--attention` picks the softmax layers' kernel: `decode` (what the rollout workers use) or SDPA.

Each context is reached synthetically: the cache is filled with random keys/values and linear
states of the right shapes (a decode step's cost does not depend on their values; really
prefilling 32k tokens into the softmax model would take minutes here). Then one sequence decodes
through the engine's decode step, the three contexts taking turns step by step; the median per-token
time is reported, with the sequence's state memory (linear states + KV).

    python benchmarks/decode_scaling.py [--steps 16] [--threads 1] [--kv-heads 1] [--attention decode|sdpa]
        [--families tiny-qwen3_5 tiny-kimi_linear tiny-nemotron_h]

`--families` adds tiny presets of other linear-state families (hidden 64), each beside its twin with
every linear layer made softmax; their linear layers run transformers' torch path. Each model's step is
also split by layer kind (`*_softmax_layers_ms_*`, `*_linear_layers_ms_*`, `*_other_layers_ms_*`: the
median time per step inside its softmax, linear-state and stateless decoder layers; the rest of a step is
the embedding, the masks and the head), which shows which layers grow with context.

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
from rollout.families import layer_kinds
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


def layer_clocks(model) -> dict[str, list[float]]:
    """Forward hooks that add each decoder layer's seconds to its kind's running total (softmax, linear or
    other: Nemotron-H's MLP and MoE layers); the caller reads and clears the totals each step."""
    kinds = {"full_attention": "softmax", "linear_attention": "linear"}
    clocks = {"softmax": [0.0], "linear": [0.0], "other": [0.0]}
    for layer, kind in zip(model.model.layers, layer_kinds(model.config)):
        clock = clocks[kinds.get(kind, "other")]
        layer.register_forward_pre_hook(lambda *_, c=clock: c.append(-time.perf_counter()))
        layer.register_forward_hook(lambda *_, c=clock: c.append(c.pop() + time.perf_counter()))
    return clocks


@torch.no_grad()
def per_step_seconds(model, clocks, steps: int, rows: int = 1) -> list[tuple[float, float, dict]]:
    """For each of CONTEXTS: the median seconds of one decode step of `rows` sequences, their state in MiB,
    and the median seconds per step in each kind of layer (`layer_clocks`). The contexts take turns step by
    step, so that load from other processes on a shared machine hits each alike."""
    device = model.lm_head.weight.device
    caches = [cache_at_context(model, rows, c) for c in CONTEXTS]
    masks = [torch.ones((rows, c), dtype=torch.long, device=device) for c in CONTEXTS]
    tokens = [torch.full((rows,), 5, device=device) for _ in CONTEXTS]
    times, split = [[] for _ in CONTEXTS], [{k: [] for k in clocks} for _ in CONTEXTS]
    for step in range(steps + 3):  # 3 warm-up steps
        for i, context in enumerate(CONTEXTS):
            masks[i] = torch.nn.functional.pad(masks[i], (0, 1), value=1)
            for clock in clocks.values():
                clock[:] = [0.0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            positions = torch.full((rows,), context + step, device=device)
            tokens[i] = decode_step(model, caches[i], masks[i], positions, tokens[i]).argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
            for k, clock in clocks.items():
                split[i][k].append(sum(clock))
    return [(statistics.median(t[3:]), state_mib(cache), {k: statistics.median(v[3:]) for k, v in sp.items()})
            for t, cache, sp in zip(times, caches, split)]


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
        clocks = layer_clocks(model)
        seconds, memory, splits = zip(*per_step_seconds(model, clocks, args.steps))
        for c, s, m, split in zip(CONTEXTS, seconds, memory, splits):
            result[f"{name}_ms_per_token_{c // 1024}k"] = round(s * 1e3, 2)
            result[f"{name}_state_mib_{c // 1024}k"] = round(m, 2)
            for kind, t in split.items():
                if t:
                    result[f"{name}_{kind}_layers_ms_{c // 1024}k"] = round(t * 1e3, 2)
        result[f"{name}_ratio_32k_over_1k"] = round(seconds[-1] / seconds[0], 2)
    result["target_hybrid_ratio"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
