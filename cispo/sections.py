"""The recipe's sections, one typed model each, composed into `cispo.config.Recipe`. Sections owned by
another package or role live beside it (rollout.config, rewards.config, cispo.loss.LossConfig); the
registries a field chooses from are imported here as plain modules."""
from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

import warnings

from cispo.advantages import ESTIMATORS
from cispo.corrections import CorrectionConfig
from cispo.data import FORMATS
from cispo.loss import LossConfig
from cispo.sampling import OVERLONG
from cispo.section import Section, choice


class RunConfig(Section):
    dir: str = Field("runs/default", description="run directory: config.yaml, metrics.jsonl, summary.json, ckpt/")
    seed: int = Field(0, description="seeds data order, sampling and initialization")
    max_steps: int = Field(100, ge=0, description="RL steps")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in run.dir")
    save_every: int = Field(10, ge=1, description="checkpoint every N RL steps (and at the last step)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after RL)")
    threads: int = Field(0, ge=0, description="torch threads per actor; 0 uses every core")


# Our column names a data file's columns can be mapped to (data.columns, data.sources[].columns).
Columns = dict[Literal["prompt", "answer", "target", "source"], str]
COLUMNS_HELP = ("the file's column for each of ours (prompt, answer, target, source), e.g. {prompt: question}; "
                "a mapped source column names each row's own source, which picks its reward (reward.sources)")


class SourceConfig(Section):
    name: str = Field(..., description="names the source in metrics and in reward.sources")
    format: str = choice(FORMATS, "how rows are read: arith (generated, no file); jsonl: "
                         "'prompt'/'answer'[/'target']; gsm8k; math: 'problem'/'solution' with \\boxed{}; apps; "
                         "humaneval; verl: verl's parquet layout (chat-message 'prompt', "
                         "'reward_model.ground_truth', 'data_source' as each row's source)", "jsonl")
    path: str | None = Field(None, description="training rows: .jsonl, .jsonl.gz, .json, .csv, .parquet, .arrow or "
                             "a datasets save_to_disk directory; not for arith")
    eval_path: str | None = Field(None, description="held-out rows in the same format")
    columns: Columns = Field(default_factory=dict, description=COLUMNS_HELP)
    weight: float = Field(1.0, ge=0, description="share of each batch, relative to the other active sources")
    start_step: int = Field(0, ge=0, description="curriculum: the RL step at which this source joins the mix")
    ramp_steps: int = Field(0, ge=0, description="curriculum: steps over which its weight rises from 0 to weight")


class DataConfig(Section):
    source: str = choice(FORMATS, "the single source's format when data.sources is empty", "arith")
    path: str | None = Field(None, description="training rows, as data.sources[].path (e.g. JSONL with 'prompt' "
                             "and 'answer')")
    eval_path: str | None = Field(None, description="held-out rows for evaluation, in the same format")
    columns: Columns = Field(default_factory=dict, description=COLUMNS_HELP)
    sources: list[SourceConfig] = Field(default_factory=list, description="a weighted mix of sources with a "
                                        "curriculum; replaces source/path/eval_path when given")
    on_bad_row: Literal["error", "skip"] = Field("error", description="a malformed row: stop with file:line, "
                                                 "or skip it and count it")
    digits: int = Field(2, ge=1, le=6, description="arith: operand digits")
    eval_size: int = Field(200, ge=1, description="held-out prompts scored before and after RL, per source")
    streaming: bool = Field(False, description="read each training file as a stream (datasets' IterableDataset), "
                            "for files larger than memory or than the disk's room for datasets' Arrow cache: "
                            "batches are its next rows in a seeded shuffle-buffer order, each row checked as it is "
                            "read; held-out files are still read whole. Resume does not redraw the same rows")
    shuffle_buffer: int = Field(10_000, ge=1, description="data.streaming: rows held to shuffle a stream (more "
                                "is closer to a uniform draw, and costs memory)")
    prompts_per_step: int = Field(16, ge=1, description="prompts per RL step (each sampled n times)")

    def mix(self) -> list[SourceConfig]:
        """The sources to draw from: `sources`, or the single source/path/eval_path as a one-source mix."""
        return self.sources or [SourceConfig(name=self.source, format=self.source, path=self.path,
                                             eval_path=self.eval_path, columns=self.columns)]

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v):
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if v and not any(s.weight > 0 and s.start_step == 0 for s in v):
            raise ValueError("at least one source needs weight > 0 and start_step 0, or the first batches are empty")
        return v


class AlgorithmConfig(LossConfig, CorrectionConfig):
    """The loss's keys (cispo.loss.LossConfig) and the mismatch correction's (cispo.corrections), what the
    trainer ranks get, and the controller's: advantages, dynamic sampling, overlong responses, updates per
    batch, π_old."""
    advantage: str = choice(ESTIMATORS,
                            "group_std: Eq. 2; no_std: Dr. GRPO; leave_one_out: RLOO baseline", "group_std")
    dynamic_sampling: bool = Field(True, description="drop prompt groups whose rewards all agree and refill (DAPO, M1)")
    max_refill_draws: int = Field(4, ge=0, description="dynamic sampling: most extra generation rounds per step")
    overlong: str = choice(OVERLONG, "responses cut by the budget or repetition: none keeps "
                           "them, zero sets their reward to 0, mask drops them from the loss, soft is DAPO's soft "
                           "overlong penalty", "none")
    overlong_buffer: int = Field(0, ge=0, description="soft: the last N tokens of the budget, where the penalty ramps")
    overlong_penalty: float = Field(1.0, ge=0, description="soft: the penalty at the budget")
    updates_per_batch: int = Field(16, ge=1, description="off-policy minibatch updates per generation batch (M1: 16)")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        "rollout", description="π_old of the IS weight: the rollout engine's logprobs, or the trainer's own forward "
                               "before the first update (one more forward per step; logs old_logprob_gap, the "
                               "train/inference mismatch M1 §3.2 fixed with the fp32 head)")
    routing_replay: bool = Field(False, description="MoE routing replay (R3): the rollout engine records each "
                                 "token's experts per MoE layer and the trainer's forward uses them instead of its "
                                 "router's top-k, gate weights still from its router (rollout/routing.py); needs "
                                 "rollout.engine: cispo and a MiniMax, Qwen3-MoE, Qwen3.5-MoE or Qwen3-Next model")

    @model_validator(mode="after")
    def _correction_needs_both_logprobs(self):
        if self.correction != "none" and self.old_logprobs != "recompute":
            raise ValueError(f"algorithm.correction={self.correction} weighs π_old against the rollout logprobs, so "
                             "π_old must be the trainer's own: set algorithm.old_logprobs=recompute")
        if self.updates_per_batch == 1 and self.old_logprobs == "recompute" and self.name in ("cispo", "cispo_masked"):
            warnings.warn("algorithm.updates_per_batch=1 with old_logprobs=recompute: π_θ = π_old at the only "
                          "update, so the IS weight is 1 and CISPO is plain REINFORCE (SkyRL#1859); a "
                          "correction still acts", stacklevel=2)
        return self

    def loss_section(self) -> LossConfig:
        """The keys the loss reads, as the loss's own section."""
        return LossConfig(**self.model_dump(include=set(LossConfig.model_fields)))


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0, description="peak learning rate of the RL updates (M1 does not publish it)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="M1's AdamW betas")
    eps: float = Field(1e-15, gt=0, description="M1: 1e-8 stalls because most gradients are below 1e-14")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm to this (M1's 80k stage lowers it)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up, in optimizer steps")
    schedule: Literal["constant", "cosine"] = Field("constant", description="the RL learning rate after the "
                                                    "warm-up: constant, or a cosine down to 0 at the run's last "
                                                    "update (run.max_steps x algorithm.updates_per_batch), so the "
                                                    "policy settles instead of ending mid-swing")

    def lr_at(self, update: int, total: int) -> float:
        """The RL learning rate of optimizer step `update` (0-based) of `total`: linear warm-up over
        `warmup_steps`, then `schedule`."""
        lr = self.lr * min(1.0, (update + 1) / max(self.warmup_steps, 1))
        if self.schedule == "cosine" and update >= self.warmup_steps:
            done = min(1.0, (update - self.warmup_steps) / max(total - self.warmup_steps, 1))
            lr *= 0.5 * (1 + math.cos(math.pi * done))
        return lr


class SFTConfig(Section):
    steps: int = Field(0, ge=0, description="most supervised warm-start steps before RL (0: none)")
    stop_at_accuracy: float | None = Field(None, gt=0, le=1, description="end the warm start once greedy eval "
                                           "accuracy reaches this (checked every eval_every steps)")
    eval_every: int = Field(50, ge=1, description="warm-start steps between accuracy checks")
    lr: float = Field(1e-3, gt=0, description="learning rate of the warm start (constant)")
    batch_size: int = Field(64, ge=1, description="prompts per warm-start step, each with its demonstration")


# The top-level keys DeepSpeed's own config parser reads (deepspeed.runtime.config.DeepSpeedConfig,
# DeepSpeed 0.19.8), written out because importing DeepSpeed imports torch; tests/cispo/test_first_contact.py
# records what that parser reads and fails when this list and it disagree.
DEEPSPEED_KEYS = frozenset("""
activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger communication_data_type
compile compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last
datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue elasticity expert_parallel
flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op gradient_clipping gradient_predivide_factor
graph_harvesting hybrid_engine log_level managed_gradient_accumulation memory_breakdown nebula optimizer pipeline
prescale_gradients progressive_layer_drop quantize_training scheduler seq_parallel_communication_data_type
sparse_attention sparse_gradients steps_per_print tensor_parallel tensorboard timers torch_autocast
train_batch_size train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size
wall_clock_breakdown wandb weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
zero_optimization
""".split())


def _deepspeed_key(key: str) -> str:
    # DeepSpeed ignores a top-level key it does not know, so a misspelled section would silently do nothing.
    if key not in DEEPSPEED_KEYS:
        close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"DeepSpeed has no top-level key {key!r}{hint}")
    return key


class TrainerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks, one Ray actor each")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 + "
                            "gradients, 3 + parameters sharded over the ranks")
    micro_batch_size: int = Field(64, ge=1, description="most sequences per forward/backward")
    micro_batch_tokens: int = Field(16384, ge=1, description="most padded tokens (sequences x longest) per "
                                    "forward/backward; a longer sequence goes alone (with length_bucketing)")
    length_bucketing: bool = Field(True, description="sort each minibatch by length before cutting micro-batches, so "
                                   "each pads only to rows of similar length; false: arrival order, micro_batch_size "
                                   "rows at a time (the baseline of benchmarks/train_throughput.py)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward: less memory, "
                                         "about one more forward of time")
    deepspeed: dict[Annotated[str, AfterValidator(_deepspeed_key)], Any] = Field(
        default_factory=dict, description="merged key by key over the generated DeepSpeed config "
        "(cispo.trainer.deepspeed_config): bf16, zero_optimization.offload_optimizer, ...; top-level keys are "
        "checked against DeepSpeed's")

    @model_validator(mode="after")
    def _bf16_needs_zero(self):
        if self.deepspeed.get("bf16", {}).get("enabled") and self.zero_stage == 0:
            raise ValueError("bf16 needs zero_stage >= 1: DeepSpeed's stage-0 bf16 optimizer takes an Adam step with "
                             "zero gradients at start-up, so every later bias correction is off by one step")
        return self


class EvalConfig(Section):
    """`cispo eval` and the accuracy a run reports before and after RL use greedy decoding; `cispo eval`
    can estimate pass@k instead."""
    n_samples: int = Field(1, ge=1, description="cispo eval: samples per held-out prompt; 1 scores greedy accuracy")
    k: int = Field(1, ge=1, description="cispo eval: pass@k, the unbiased estimate from n_samples samples "
                                       "(Chen et al. 2021)")

    @model_validator(mode="after")
    def _k_at_most_n(self):
        if self.k > self.n_samples:
            raise ValueError(f"eval.k={self.k} needs at least that many eval.n_samples (got {self.n_samples})")
        return self


class EnvConfig(Section):
    """Multi-turn episodes against an environment: read by `rollout.function: cispo.multiturn:Episodes`, and
    (agent, max_turns, max_turn_tokens) by `cispo.agent:Agents`, where a turn is one chat-completion call.
    An episode's token budget across its turns (sampled and inserted tokens) is rollout.max_new_tokens."""
    name: str | None = Field(None, description="the environment class, 'module:Class' (cispo.env): a subclass of "
                             "cispo.env.Environment, a Gymnasium-style text environment, or an OpenEnv Environment "
                             "(run in-process); imported from the working directory, the recipe's directory and "
                             "sys.path")
    agent: str | None = Field(None, description="agent mode: the agent function, 'module:function', called as "
                              "fn(base_url, task) once per sample; it talks to the policy with the openai client "
                              "at base_url and returns the episode's reward (cispo.agent)")
    tools: list[Literal["python", "shell"]] = Field(default_factory=list, description="tools the model may call "
                                                    "with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>: "
                                                    "python runs its 'code' argument, shell its 'command' with /bin/sh, "
                                                    "both in the code sandbox (at reward.min_isolation, with env.tool_* "
                                                    "limits); the output is the next turn's observation")
    max_turns: int = Field(4, ge=1, description="most model turns per episode")
    max_turn_tokens: int = Field(256, ge=1, description="most tokens one model turn samples")
    tool_timeout_s: float = Field(5.0, gt=0, description="CPU seconds one tool call may run")
    tool_memory_mb: int = Field(512, ge=64, description="address-space limit of one tool call")
    max_observation_chars: int = Field(2000, ge=1, description="a tool's output is cut to this many characters")


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline writes under "
                                                           "RUN_DIR/wandb (wandb sync uploads it later)")
    project: str = Field("cispo", description="the wandb project")


class StagesConfig(Section):
    """M1 80k: the budget grows 40K -> 48K -> ... -> 80K, moving on when generated-sequence perplexity has
    converged and the 99th-percentile length nears the window (cispo.stages.advance)."""
    windows: list[int] = Field(default_factory=list, description="response-length windows in order; the last "
                               "equals rollout.max_new_tokens; empty: one stage at the budget")
    p99_fraction: float = Field(0.95, gt=0, le=1, description="advance once p99 response length >= this x window")
    plateau_steps: int = Field(10, ge=1, description="perplexity plateau: compare the mean of the last N steps "
                               "with the N before")
    plateau_tolerance: float = Field(0.02, ge=0, description="plateaued when that relative change is below this")
    max_steps_per_stage: int = Field(0, ge=0, description="advance anyway after this many steps (0: never)")

    @field_validator("windows")
    @classmethod
    def _increasing(cls, v):
        if any(b <= a for a, b in zip(v, v[1:])) or any(w < 1 for w in v):
            raise ValueError(f"windows must be positive and increasing, got {v}")
        return v


class RoleResources(Section):
    gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU only; fractions share a GPU); a rollout "
                        "worker puts its whole model on its first GPU (no sharding over several yet)")
    cpus: float = Field(1, ge=0, description="CPUs per actor")
    node_resource: str | None = Field(None, description="a Ray custom resource; the role's actors each take one "
                                      "unit, so they run only on nodes started with it (ray start --resources)")

    def ray_options(self) -> dict:
        """`.options(**...)` for this role's Ray actors."""
        extra = {"resources": {self.node_resource: 1}} if self.node_resource else {}
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, **extra}


class ResourcesConfig(Section):
    nodes: int = Field(1, ge=1, description="machines in the cluster (what `cispo plan` checks the roles against)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs on each machine (what `cispo plan` checks against)")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory per GPU; M1 trained on H800s (80 GB)")
    rollout: RoleResources = Field(default_factory=RoleResources, description="per RolloutWorker actor (unused "
                                   "when colocated)")
    trainer: RoleResources = Field(default_factory=RoleResources, description="per DeepSpeed rank actor")
    colocate: bool = Field(False, description="the rollout.num_workers replicas live in the first trainer ranks, one "
                           "each, instead of actors of their own (verl's hybrid engine): one process start-up less "
                           "per replica, on its rank's GPU; rollout and training take turns, so rollout.overlap is "
                           "refused on several ranks; `cispo eval` and `filter` give a replica a rank's resources")
