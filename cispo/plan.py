"""`cispo plan RECIPE`: resources per role, memory per GPU and FLOPs per token, computed from the model's
shape alone (no weights are built), with a warning for each way the recipe cannot fit.

Assumptions, stated once: training in bf16 with fp32 Adam (master weights, m, v) sharded by the ZeRO
stage; rollout weights in bf16 split evenly over a worker's GPUs; KV cache in bf16; the lightning
layers' state [heads, d, d] in fp32, as inference engines keep it; activations are not counted.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cispo.config import Recipe, RecipeError
from rollout.config import PRESETS, m1_layer_types

GiB = 2**30
CONTEXTS = (40_000, 80_000, 100_000)
# The preset "m1" exists for planning; M1's own tokenizer has this many entries.
PRESET_VOCAB = {"m1": 200_064}
# DeepSeek-R1's published shape, for the M1 report's comparison: 37B active parameters, 61 layers of
# MLA with 128 heads, q/k head dim 192 (128 + 64 rotary) and v head dim 128, counted as plain attention.
R1 = {"active": 37e9, "layers": 61, "heads": 128, "qk_dim": 192, "v_dim": 128}
M1_CLAIM = 0.25  # M1 report §1: about 25% of DeepSeek-R1's FLOPs at a generation length of 100K


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    linear_layers: int  # lightning attention; the rest are softmax
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    intermediate: int
    vocab: int
    max_positions: int

    @property
    def full_layers(self) -> int:
        return self.layers - self.linear_layers

    def params(self) -> tuple[int, int]:
        """(total, active per token), counted the way MiniMaxForCausalLM lays out its weights; active leaves
        out the embedding and LM head, as M1's published 45.9B does."""
        d, a = self.hidden, self.heads * self.head_dim
        linear = 5 * d * a + a  # qkv, out and gate projections, and the output norm
        full = 2 * d * a + 2 * d * self.kv_heads * self.head_dim  # q, o and the grouped k, v
        expert = 3 * d * self.intermediate  # gate, up, down
        per_layer = 2 * d + self.experts * d  # two norms and the router
        total = (self.linear_layers * linear + self.full_layers * full + self.layers * (per_layer + self.experts * expert)
                 + 2 * self.vocab * d + d)
        return total, total - self.layers * (self.experts - self.top_k) * expert - 2 * self.vocab * d

    def flops_per_token(self, context: int, hybrid: bool = True) -> float:
        """Decode FLOPs for one token at `context`: 2 per active weight and LM-head weight (the embedding
        lookup is free), plus mixing: softmax reads every cached position (QKᵀ and AV: 4·heads·d·context),
        lightning updates and reads a fixed [d, d] state per head (4·heads·d²)."""
        _, active = self.params()
        softmax_layers = self.full_layers if hybrid else self.layers
        mixing = 4 * self.heads * self.head_dim * (softmax_layers * context
                                                   + (self.layers - softmax_layers) * self.head_dim)
        return 2 * (active + self.vocab * self.hidden) + mixing


def r1_flops_per_token(context: int) -> float:
    return 2 * R1["active"] + R1["layers"] * 2 * R1["heads"] * (R1["qk_dim"] + R1["v_dim"]) * context


def model_shape(recipe: Recipe) -> tuple[Shape, str]:
    """The shape from model.path's config.json when it is here, else from the preset and overrides."""
    m = recipe.model
    config_json = Path(m.path or "", "config.json")
    if m.path and config_json.is_file():
        cfg, where = json.loads(config_json.read_text()), f"{config_json}"
    else:
        # What build_hybrid would build, read from the presets' plain data (a MiniMaxConfig would import torch).
        cfg = {**PRESETS[m.preset], **m.overrides}
        cfg.setdefault("layer_types", m1_layer_types(cfg["num_hidden_layers"]))
        cfg["vocab_size"] = PRESET_VOCAB.get(m.preset, len(set(m.alphabet)) + 4)  # the char tokenizer's + 4 special
        where = f"preset {m.preset!r}" + (f" (model.path {m.path} is not here)" if m.path else "")
    if cfg.get("model_type", "minimax") != "minimax":
        raise RecipeError(f"cispo plan counts MiniMax's layout only; {where} is a {cfg['model_type']} model, whose "
                          f"parameters and state it does not model yet")
    # MiniMax's own released config.json lists the layout as attn_type_list (1: softmax, 0: lightning).
    types = cfg.get("layer_types") or ["full_attention" if t else "linear_attention" for t in cfg["attn_type_list"]]
    heads = cfg["num_attention_heads"]
    return Shape(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], linear_layers=types.count("linear_attention"), heads=heads,
                 kv_heads=cfg.get("num_key_value_heads") or heads,
                 head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                 experts=cfg.get("num_local_experts", 1), top_k=cfg.get("num_experts_per_tok", 1),
                 intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                 max_positions=cfg.get("max_position_embeddings", 0)), where


@dataclass
class Plan:
    shape: Shape
    shape_source: str
    roles: list[tuple[str, int, str]]  # (role, actors, what each takes)
    memory: dict[str, dict[str, float]]  # role -> component -> bytes, per GPU (per actor on CPU)
    flops: list[tuple[int, float, float]]  # (context, hybrid, all-softmax)
    warnings: list[str] = field(default_factory=list)


def build(recipe: Recipe) -> Plan:
    shape, where = model_shape(recipe)
    res, r, t = recipe.resources, recipe.rollout, recipe.trainer
    total, _ = shape.params()
    warnings = []

    def takes(role) -> str:
        where_ = f" on nodes with resource '{role.node_resource}'" if role.node_resource else ""
        return f"{role.gpus:g} GPU, {role.cpus:g} CPU{where_}"

    # resources.colocate: each replica lives in a trainer rank, on its GPU and in its memory
    hosted = "inside a trainer rank (resources.colocate)"
    roles = [("rollout", r.num_workers, hosted if res.colocate else takes(res.rollout)),
             ("trainer", t.num_ranks, takes(res.trainer)),
             ("reward", recipe.reward.num_workers, "1 CPU, a process on the controller's node")]

    budget = r.max_new_tokens  # the last stage window, when there are stages
    sequences = math.ceil(recipe.data.prompts_per_step * r.n_samples / r.num_workers)  # decoded at once per worker
    kv = shape.full_layers * 2 * shape.kv_heads * shape.head_dim * 2 * budget
    state = shape.linear_layers * shape.heads * shape.head_dim**2 * 4
    g = max(1.0, (res.trainer if res.colocate else res.rollout).gpus)
    rollout = {"weights (bf16)": 2 * total / g, f"KV cache ({sequences} seq x {budget:,} tok)": sequences * kv / g,
               f"linear-attention state ({sequences} seq)": sequences * state / g}
    # ZeRO-1 shards the optimizer over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too.
    n = t.num_ranks
    trainer = {"weights (bf16)": 2 * total / (n if t.zero_stage >= 3 else 1),
               "gradients (bf16)": 2 * total / (n if t.zero_stage >= 2 else 1),
               "optimizer (fp32 master, m, v)": 12 * total / (n if t.zero_stage >= 1 else 1)}
    memory = {"rollout": rollout, "trainer": {**trainer, **{f"rollout {k}": v for k, v in rollout.items()}}
              if res.colocate else trainer}

    for name, role, per in (("rollout", res.rollout, {} if res.colocate else rollout), ("trainer", res.trainer, memory["trainer"])):
        need = sum(per.values()) / GiB
        if role.gpus and need > res.gpu_memory_gb:
            warnings.append(f"{name}: needs {need:.1f} GiB per GPU, more than resources.gpu_memory_gb="
                            f"{res.gpu_memory_gb:g}" + (" (more ranks or a higher ZeRO stage would shard it)"
                                                        if name == "trainer" else " (more GPUs per worker)"))
        if role.gpus > res.gpus_per_node:
            warnings.append(f"{name}: an actor takes {role.gpus:g} GPUs but a node has resources.gpus_per_node="
                            f"{res.gpus_per_node}; a Ray actor cannot span nodes")
    gpus = (0 if res.colocate else r.num_workers * res.rollout.gpus) + t.num_ranks * res.trainer.gpus
    if gpus > res.nodes * res.gpus_per_node:
        warnings.append(f"the roles need {gpus:g} GPUs; the cluster has {res.nodes} x {res.gpus_per_node}")
    if shape.max_positions and budget > shape.max_positions:
        warnings.append(f"rollout.max_new_tokens={budget:,} exceeds the model's max_position_embeddings="
                        f"{shape.max_positions:,}")
    for s in recipe.data.mix():
        for path in (s.path, s.eval_path):
            if path and not Path(path).is_file():
                warnings.append(f"data source {s.name!r}: {path} is not on this machine")
        try:  # as the run will: a user's module imported, the code sandbox probed
            recipe.source_reward(s.name)
        except RecipeError as err:
            warnings.append(f"data source {s.name!r}: {err}")
    flops = [(c, shape.flops_per_token(c), shape.flops_per_token(c, hybrid=False)) for c in CONTEXTS]
    return Plan(shape, where, roles, memory, flops, warnings)


def _count(x: float) -> str:
    return next(f"{x / d:.2f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if x >= d or d == 1)


def render(plan: Plan, recipe: Recipe) -> str:
    s, res = plan.shape, recipe.resources
    total, active = s.params()
    lines = [f"model: {s.layers} layers ({s.linear_layers} lightning, {s.full_layers} softmax), hidden {s.hidden}, "
             f"{s.experts} experts top-{s.top_k}, vocab {s.vocab:,} — from {plan.shape_source}",
             f"  parameters: {_count(total)} total, {_count(active)} active per token (without embedding and head)",
             f"budget: {recipe.rollout.max_new_tokens:,} tokens" +
             (f", stage windows {' -> '.join(f'{w:,}' for w in recipe.stages.windows)}" if recipe.stages.windows else ""),
             "", f"resources (cluster: {res.nodes} node(s) x {res.gpus_per_node} GPUs, {res.gpu_memory_gb:g} GiB each)"]
    lines += [f"  {role:<8} {n:>4} x {what}" for role, n, what in plan.roles]
    for role, parts in plan.memory.items():
        gpus = (res.trainer if res.colocate else getattr(res, role)).gpus
        lines += ["", f"{role} memory per {'GPU' if gpus else 'actor (CPU; no GPU in the recipe)'}"]
        lines += [f"  {part:<44} {b / GiB:>10.2f} GiB" for part, b in parts.items()]
        lines.append(f"  {'total' + (f' (of {res.gpu_memory_gb:g})' if gpus else ''):<44} "
                     f"{sum(parts.values()) / GiB:>10.2f} GiB")
    lines += ["", "FLOPs per generated token at context length (hybrid vs all-softmax of the same shape)"]
    lines += [f"  {c // 1000:>4}K   hybrid {h:.3e}   all-softmax {f:.3e}   hybrid/softmax {h / f:6.1%}"
              for c, h, f in plan.flops]
    c, h, _ = plan.flops[-1]
    lines.append(f"  M1 report: M1 uses ~{M1_CLAIM:.0%} of DeepSeek-R1's FLOPs at 100K generation; this model vs "
                 f"R1's published shape by the same count: {100 * h / r1_flops_per_token(c):.3g}%")
    lines += ["", *(f"warning: {w}" for w in plan.warnings)] if plan.warnings else ["", "fits: no warnings"]
    return "\n".join(lines)
