"""Config sections owned by `rollout`: which model, and how to sample from it. Also the model presets' shapes,
as plain data, so `cispo plan` can read them without importing torch."""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The MiniMax presets follow M1: seven lightning-attention layers, then one softmax layer, repeated. Keys are
# MiniMaxConfig's; max_position_embeddings is spelled out (131,072 is its default) because plan reads it.
PRESETS: dict[str, dict] = {
    # 3.8M parameters: the CPU calibration model (docs/notes.md#tiny).
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, block_size=64,
                 max_position_embeddings=131_072),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2, block_size=128,
                  max_position_embeddings=131_072),
    # MiniMax-M1's published shape (456B total, 45.9B active); for planning, not for this machine.
    "m1": dict(hidden_size=6144, intermediate_size=9216, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8, head_dim=128, num_local_experts=32, num_experts_per_tok=2,
               block_size=256, max_position_embeddings=10_240_000),
}
# One tiny preset per other linear-state family (rollout.families), in its own config class's keys with
# its `model_type`: random models of each family's layout to try the engine and trainer without weights.
# Special-token ids are unset: some classes default to ids of their real vocabularies (Kimi's pad is 163839).
_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
_TINY_GDN = dict(_TINY, num_hidden_layers=4, intermediate_size=128, head_dim=16, linear_key_head_dim=16,
                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 layer_types=["linear_attention"] * 3 + ["full_attention"])
_TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64)
# Kimi Linear and Ling 2.5: MLA softmax layers, one dense MLP then MoE.
_TINY_MLA = dict(_TINY, num_hidden_layers=4, num_key_value_heads=4, intermediate_size=128, kv_lora_rank=32,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                 layer_types=["linear_attention"] * 3 + ["full_attention"], mlp_layer_types=["dense"] + ["sparse"] * 3,
                 num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
PRESETS.update({
    "tiny-qwen3_5": dict(_TINY_GDN, model_type="qwen3_5_text"),
    "tiny-qwen3_5_moe": dict(_TINY_GDN, model_type="qwen3_5_moe_text", **_TINY_MOE),
    "tiny-qwen3_next": dict(_TINY_GDN, model_type="qwen3_next", **_TINY_MOE),
    "tiny-kimi_linear": dict(_TINY_MLA, model_type="kimi_linear", linear_head_dim=16, linear_num_heads=4),
    "tiny-bailing_hybrid": dict(_TINY_MLA, model_type="bailing_hybrid", head_dim=16, n_group=1, topk_group=1,
                                num_mtp_layers=0),
    "tiny-llama": dict(_TINY, model_type="llama", num_hidden_layers=2, intermediate_size=128, head_dim=16),
    # The period of Nemotron-3-Nano-30B-A3B's pattern, MEMEM*E (Mamba2, MoE, attention): 3 Mamba2 layers per
    # softmax layer, which the real models exceed (23:6 in that one, 24:4 in Nemotron-H-8B).
    "tiny-nemotron_h": dict(_TINY, model_type="nemotron_h", head_dim=16, intermediate_size=128,
                            layers_block_type=["linear_attention", "moe"] * 2 + ["linear_attention",
                                                                                  "full_attention", "moe"],
                            ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, chunk_size=16,
                            n_routed_experts=4, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64),
})


def preset_config(name: str) -> dict:
    """The config fields of preset `name` (MiniMaxConfig's unless it names a `model_type`); ValueError naming
    the valid presets if there is none."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def m1_layer_types(num_layers: int, linear_per_full: int = 7) -> list[str]:
    """Seven linear layers then one full-attention layer, repeated (layer 0 is linear)."""
    period = linear_per_full + 1
    return ["full_attention" if (i + 1) % period == 0 else "linear_attention" for i in range(num_layers)]




class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    preset: str = Field("tiny", description="preset for a fresh random model (PRESETS): tiny | small | m1 (MiniMax), "
                        "or tiny-<model type> for another family (tiny-qwen3_5, tiny-kimi_linear, ...)")
    path: str | None = Field(None, description="an HF causal-LM directory to start from instead of a preset")
    overrides: dict = Field(default_factory=dict, description="config fields (of the preset's own config class) "
                            "applied over the preset")
    seed: int = Field(0, description="seed for a fresh model's initial weights")
    chat_template: bool = Field(False, description="encode each prompt as one user turn of the tokenizer's chat "
                                "template, with its generation prompt; false: tok(prompt) (with the tokenizer's "
                                "own special tokens, e.g. BOS)")
    alphabet: str = Field(string.digits + string.ascii_letters + string.punctuation + " \n",
                          description="characters of the offline character-level tokenizer (fresh models only)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v):
        preset_config(v)
        return v


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="RolloutWorker Ray actors")
    n_samples: int = Field(8, ge=1, description="G: responses per prompt")
    max_new_tokens: int = Field(40_000, ge=1, description="thinking budget per response (M1: 40k or 80k)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens whose "
                         "probability reaches this (1 disables it)")
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    stop_strings: list[str] = Field(default_factory=list, description="end a response when its text contains one "
                                    "(EOS always ends it)")
    repetition_tokens: int = Field(3000, ge=1, description="M1: stop after this many consecutive confident tokens")
    repetition_prob: float = Field(0.99, gt=0, le=1, description="what 'confident' means for the repetition stop")
    max_batch_rows: int = Field(256, ge=1, description="sequences one worker decodes together; queued requests "
                                "join as rows finish")
    max_kept_sessions: int = Field(256, ge=0, description="sessions (multi-turn episodes) whose state a worker "
                                   "keeps between their turns, so a turn prefills only its new tokens; past this "
                                   "the least recently kept is evicted and its next turn re-prefills (0: keep none)")
    threads: int = Field(0, ge=0, description="torch threads per worker; 0 uses every core (phases run one at a time)")
    engine: Literal["cispo", "hf", "vllm"] = Field("cispo", description="the decode engine a worker runs "
                                                   "(rollout.worker.ENGINES): cispo (ours: continuous "
                        "batching, any supported HF causal LM) | hf (transformers' generate, one request at a time) | "
                        "vllm (vLLM in-process, for the dense and MoE models it serves; the `vllm` extra; no top_k/top_p)")
    function: str = Field("rollout.trajectory:single_turn", description="the rollout function, 'module:fn' "
                          "(rollout.trajectory.RolloutFunction), imported from the working directory, the recipe's "
                          "directory and sys.path: it turns a draw's prompts into trajectories by calling the engine, "
                          "and marks which tokens train; a class there is built once as Class(recipe, tokenizer) "
                          "and its instance called. cispo.multiturn:Episodes plays multi-turn episodes (env.*)")
    max_staleness: int = Field(0, ge=0, description="how many weight versions older than the trainer's a "
                               "sampled token may be when it trains; 0: the synchronous loop. Checked when a "
                               "request is admitted (cispo.config), never by dropping results")
    overlap: bool = Field(False, description="asynchronous rollouts: step t+1 generates while step t trains, "
                          "from the weights before step t (its tokens one version older); needs max_staleness >= 1")
    partial_tokens: int = Field(0, ge=0, description="partial rollouts: each step decodes at most this many tokens "
                                "per response; one not finished is paused and continued next step under the new "
                                "weights (prompt + its tokens re-prefilled), and a step trains only finished "
                                "groups. 0: a response finishes within its step")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="the workers' weight dtype; auto: bf16 on a "
                                                   "GPU, fp32 on the CPU. The LM head stays fp32 either way (M1 §3.2)")

    @model_validator(mode="after")
    def _vllm_sampling(self):
        if self.engine == "vllm" and (self.top_k or self.top_p < 1):
            raise ValueError("rollout.engine=vllm does not support top_k/top_p (vLLM's logprobs are then of the "
                             "filtered distribution, not the trainer's); use rollout.engine: cispo")
        return self


# Architectures vLLM does not serve that this project trains, and why.
VLLM_REFUSES = {"MiniMaxForCausalLM": "vLLM removed MiniMax's lightning-attention models after v0.23"}


def vllm_refuses(model: ModelConfig) -> str | None:
    """Why vLLM cannot serve the model `model` names ("<architecture> (<reason>)"), or None if it may: a preset
    without a model_type is MiniMax; a model.path is read from its config.json when it exists (a recipe for a
    cluster still loads where the path does not)."""
    if model.path:
        config = Path(model.path) / "config.json"
        archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    else:
        archs = [] if "model_type" in PRESETS[model.preset] else ["MiniMaxForCausalLM"]
    return next((f"{a} ({VLLM_REFUSES[a]})" for a in archs if a in VLLM_REFUSES), None)


# Model types whose MoE routers routing replay covers (rollout.routing): softmax top-k routers that return
# (router logits, top-k weights, top-k indices).
ROUTING_REPLAY_TYPES = ("minimax", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")


def model_type(model: ModelConfig) -> str | None:
    """The transformers model type `model` names: its preset's (MiniMax where the preset names none), or
    model.path's config.json's; None where that file does not exist here (a recipe for a cluster)."""
    if model.path:
        config = Path(model.path) / "config.json"
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return {**PRESETS[model.preset], **model.overrides}.get("model_type", "minimax")
