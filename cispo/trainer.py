"""The trainer role: one Ray actor per DeepSpeed rank (gloo on CPU, nccl on GPUs), running SFT and policy
updates, and `TrainerGroup`, the controller's handle on all ranks at once."""
from __future__ import annotations

import os
import socket
from collections import Counter
from contextlib import contextmanager

import ray
import torch
from torch import nn

from cispo.batching import TrainBatch, minibatches, shard
from cispo.config import Recipe
from cispo.data import derive_seed
from cispo.corrections import CorrectionConfig, correction_factor, mismatch_figures, staleness_histogram
from cispo.loss import LossConfig, policy_health, resolve
from cispo.section import RecipeError
from cispo.sections import OptimConfig, TrainerConfig
from rollout.families import family_of
from rollout.model import load_model, token_logprobs
from rollout.routing import RoutingReplay
from rollout.worker import Replica


def _merge(base: dict, override: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in override.items()}}


def deepspeed_config(t: TrainerConfig, o: OptimConfig, world_size: int) -> dict:
    """Ours, with the recipe's `trainer.deepspeed` merged over it key by key."""
    base = {
        # Micro-batches vary in rows (cispo.batching); the boundary of each update is set by hand.
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # The client torch AdamW keeps M1's eps=1e-15 and avoids compiling fused_adam (docs/notes.md#deepspeed).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if t.deepspeed.get("bf16", {}).get("enabled"):
        # MiniMax multiplies bf16 activations by its fp32 decay buffers, which fails; only rotary's stay fp32.
        base["data_types"] = {"buffer_dtype": "bf16", "keep_in_fp32_modules": ["rotary_emb"]}
    if "offload_optimizer" in t.deepspeed.get("zero_optimization", {}):
        base["zero_force_ds_cpu_optimizer"] = False  # offload our client AdamW (with M1's eps) as it is
    return _merge(base, t.deepspeed)


class LogprobModel(nn.Module):
    """The causal LM with M1's fp32 head as one module whose forward returns per-token log π and entropy.

    ZeRO-3 gathers a module's own parameters around its forward and backward. The head weight is read
    here rather than inside lm_head's forward, so it is registered as an external parameter of this module.
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, input_ids: torch.Tensor, temperature: float = 1.0):
        hidden = self.causal_lm.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        return token_logprobs(hidden, self.causal_lm.lm_head.weight, input_ids[:, 1:], temperature=temperature)


@ray.remote
class Trainer:
    """One DeepSpeed rank. It gets the recipe's values it reads, by name, never the whole recipe (whose
    validation would import every reward, the code sandbox included): its sections `trainer`, `optim`
    and `loss` (cispo.loss.LossConfig, keys under `algorithm`), `correction` (cispo.corrections), and
    `old_logprobs`, `routing_replay`, `sft_lr`, `seed`, `threads`. `search` holds the directories a user's 'module:function' loss is imported from;
    `total_updates` is the run's count of RL optimizer steps (max_steps × updates_per_batch), where a cosine
    schedule reaches 0."""

    def __init__(self, model_dir: str, rank: int, world_size: int, *, trainer: TrainerConfig, optim: OptimConfig,
                 loss: LossConfig, correction: CorrectionConfig, old_logprobs: str, routing_replay: bool,
                 sft_lr: float, seed: int, threads: int, search: list[str], total_updates: int):
        self.model_dir, self.rank, self.world_size = model_dir, rank, world_size
        self.trainer, self.optim, self.loss, self.old_logprobs = trainer, optim, loss, old_logprobs
        self.correction, self.routing_replay = correction, routing_replay
        self.sft_lr, self.seed, self.threads, self.search = sft_lr, seed, threads, search
        self.skipped_steps = 0
        self.total_updates = total_updates  # where the RL learning rate's schedule ends (OptimConfig.lr_at)

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group: this node's IP and a free port on it."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init(self, master_addr: str, master_port: int) -> None:
        # A user's loss module is imported here, on every rank; one that fails frees the ranks (start).
        self.loss_fn = resolve(self.loss.name, self.search)
        gpu = torch.cuda.is_available()
        os.environ.update(RANK=str(self.rank), LOCAL_RANK="0", WORLD_SIZE=str(self.world_size),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
        # Ray pins actors to one thread; phases run one at a time, so let the active one use every core.
        torch.set_num_threads(self.threads or os.cpu_count())
        torch.manual_seed(self.seed + self.rank)
        import deepspeed

        if not gpu:
            # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce at init (g++, ~44 CPU-s on a
            # new machine or venv, behind a file lock every other rank waits on) that only its inference
            # tensor-parallel layers call; ZeRO's collectives go through gloo, so it is marked unbuildable in
            # the probe results DeepSpeed keeps (one dict per process, read when the backend starts).
            from deepspeed.ops import __compatible_ops__ as buildable

            buildable["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        t, o = self.trainer, self.optim
        causal_lm = load_model(self.model_dir)
        if t.gradient_checkpointing:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = LogprobModel(causal_lm).train()
        if t.zero_stage == 3:
            # Which experts run depends on the tokens, so ranks would gather different modules in different
            # orders and deadlock; a leaf MoE block gathers all its experts at once.
            leaves = family_of(causal_lm.config).leaf_modules(causal_lm)
            if leaves:
                deepspeed.utils.set_z3_leaf_modules(causal_lm, leaves)
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(t, o, self.world_size))
        if t.zero_stage == 3:
            deepspeed.zero.register_external_parameter(self.engine.module, causal_lm.lm_head.weight)
        self.causal_lm = causal_lm
        self.replay = RoutingReplay(causal_lm) if self.routing_replay else None

    def _forward(self, mb: TrainBatch, temperature: float):
        """(log π, entropy) of `mb`'s targets, routed as the rollout was when routing replay is on; the replay
        stays set until `_forward_done`, since activation checkpointing reruns the forward in the backward."""
        if self.replay is not None:
            self.replay.set(mb.routing, mb.input_ids.shape[1])
        return self.engine(mb.input_ids, temperature)

    def _forward_done(self) -> None:
        if self.replay is not None:
            self.replay.set(None)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _update(self, micro_batches: list[TrainBatch], per_token_loss, temperature: float = 1.0) -> dict:
        """One optimizer step over this rank's micro-batches (cispo.batching); `per_token_loss(logp, mb)`
        gives (ℓ [B, T], figures: name -> [B, T]).

        Each micro-batch carries per-token `weights` that make Σ w·ℓ over every rank's micro-batches the
        whole minibatch's normalized loss. DeepSpeed averages gradients over ranks, hence × world size.
        """
        loss_sum, logprobs, entropies, figures = 0.0, [], [], {}
        for i, mb in enumerate(micro_batches):
            mb = mb.to(self.engine.device)
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            logp, entropy = self._forward(mb, temperature)
            per_token, mb_figures = per_token_loss(logp, mb)
            loss = (per_token * mb.weights * (1 if mb.correction is None else mb.correction)).sum()
            self.engine.backward(loss * self.world_size)
            self._forward_done()
            loss_sum += loss.item()
            on = mb.loss_mask.bool()
            logprobs.append(logp.detach()[on].cpu())
            entropies.append(entropy[on].cpu())
            for name, values in mb_figures.items():
                figures.setdefault(name, []).append(values.detach()[on].float().cpu())
        self.engine.step()
        # ZeRO skips an update whose gradient norm is not finite; count it (docs/notes.md#failures).
        self.skipped_steps += not self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()  # None under ZeRO-0
        norm = float(norm) if norm is not None else float("nan")
        return {"loss": loss_sum, "grad_norm": norm, "logprobs": torch.cat(logprobs), "entropy": torch.cat(entropies),
                "figures": {name: torch.cat(values) for name, values in figures.items()}}

    def sft_step(self, micro_batches: list[TrainBatch]) -> dict:
        """Cross-entropy on the reference answers (token-mean weights from the controller)."""
        self._set_lr(self.sft_lr)
        out = self._update(micro_batches, lambda logp, mb: (-logp, {}))
        return {"loss": out["loss"], "grad_norm": out["grad_norm"]}

    def train_batch(self, updates: list[list[TrainBatch]], temperature: float, first_update: int) -> dict:
        """K minibatch updates of the policy loss over one generation batch (M1 §3.1: off-policy updates);
        `updates` holds this rank's micro-batches for each. Update k runs at the learning rate of schedule
        position `first_update` + k: the step's place, (step − 1) × updates_per_batch, not a count of the
        updates done so far, so a step that trains fewer groups than updates_per_batch, or none (partial
        rollouts' first step, dynamic sampling without refill), does not hold the schedule back.

        `loss` is this rank's share (ranks sum to the minibatch loss); the other figures, the loss's own
        (cispo.loss) and `policy_health`'s, are token means with their `tokens` count, so the controller can
        combine ranks exactly.
        """
        o = self.optim
        per_token_loss = lambda logp, mb: self.loss_fn(logp, mb.old_logprobs, mb.advantages, mb.loss_mask,
                                                       group_index=mb.group_index, cfg=self.loss)
        gap = self._recompute_old_logprobs(updates, temperature) if self.old_logprobs == "recompute" else {}
        losses, norms, on_token, loss_figures = [], [], [], {}
        for k, micro_batches in enumerate(updates):
            self._set_lr(o.lr_at(first_update + k, self.total_updates))
            out = self._update(micro_batches, per_token_loss, temperature)
            losses.append(out["loss"])
            norms.append(out["grad_norm"])
            for name, values in out["figures"].items():
                loss_figures.setdefault(name, []).append(values)
            on = [mb.loss_mask.bool() for mb in micro_batches]
            old = torch.cat([mb.old_logprobs[m] for mb, m in zip(micro_batches, on)])
            adv = torch.cat([mb.advantages.unsqueeze(1).expand_as(m)[m] for mb, m in zip(micro_batches, on)])
            ids = torch.cat([mb.input_ids[:, 1:][m] for mb, m in zip(micro_batches, on)])
            on_token.append((out["logprobs"], old, adv, out["entropy"], ids))
        logp, old, adv, entropy, ids = (torch.cat(column).unsqueeze(0) for column in zip(*on_token))
        figures = {name: float(torch.cat(values).mean()) for name, values in loss_figures.items()} if logp.numel() else {}
        figures.update(policy_health(logp, old, adv, torch.ones_like(logp), entropy, token_ids=ids))
        return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), **figures, **gap,
                "tokens": logp.numel(), "skipped_steps": self.skipped_steps, "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def _recompute_old_logprobs(self, updates: list[list[TrainBatch]], temperature: float) -> dict:
        """Replace the rollout logprobs μ by this trainer's π_old, from the weights before any update; set
        each micro-batch's mismatch correction from π_old/μ (cispo.corrections); report their mean
        absolute difference over response tokens and the mismatch figures."""
        trainer, rollout, factors = [], [], []
        for mb in (mb for micro_batches in updates for mb in micro_batches):
            logp, _ = self._forward(mb.to(self.engine.device), temperature)
            self._forward_done()
            recomputed = logp.cpu() * mb.loss_mask
            mb.correction = correction_factor(self.correction, recomputed, mb.old_logprobs, mb.loss_mask)
            on = mb.loss_mask.bool()
            trainer.append(recomputed[on])
            rollout.append(mb.old_logprobs[on])
            factors.append(mb.correction[on])
            mb.old_logprobs = recomputed
        trainer, rollout = torch.cat(trainer), torch.cat(rollout)
        if not trainer.numel():
            return {}
        return {"old_logprob_gap": float((trainer - rollout).abs().mean()),
                **mismatch_figures(trainer, rollout, torch.ones_like(trainer), torch.cat(factors))}

    def save_checkpoint(self, path: str) -> None:
        # Prefixed: DeepSpeed keeps its own 'skipped_steps' and drops clashing client keys on load.
        counters = {"cispo_skipped_steps": self.skipped_steps}
        self.engine.save_checkpoint(path, tag="state", client_state=counters, save_latest=False)

    def load_checkpoint(self, path: str) -> None:
        _, counters = self.engine.load_checkpoint(path, tag="state")
        self.skipped_steps = counters["cispo_skipped_steps"]

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # resources.colocate: this rank also hosts a rollout replica (rollout.worker.RolloutPool.hosted), as verl's
    # hybrid engine does. Its weights are a copy of its own, updated only by `update_weights`, so a rollout
    # sees the published version whatever this rank has trained since; the two take turns in this process.
    def host_rollout(self, model_dir: str, pad_id: int, config, record_routing: bool) -> None:
        self.replica = Replica(model_dir, pad_id, config, record_routing)
        torch.set_num_threads(self.threads or os.cpu_count())  # one setting per process: the rank's (run.threads)

    def generate(self, requests: list) -> list:
        return self.replica.generate(requests)

    def update_weights(self, state_dict: dict, version: int) -> int:
        return self.replica.update_weights(state_dict, version)

    def start_seconds(self) -> float:
        return self.replica.start_seconds()

    def _full_weights(self):
        """Whole parameters on every rank; ZeRO-3 partitions them, so gather first (a collective:
        every rank must call the method that uses this)."""
        import deepspeed

        params = list(self.causal_lm.parameters())
        return deepspeed.zero.GatheredParameters(params, enabled=self.trainer.zero_stage == 3)

    def state_dict(self) -> dict:
        """The weights to publish; rank 0 returns them (on CPU), the others only take part in the gather."""
        with self._full_weights():
            if self.rank != 0:
                return {}
            return {k: v.detach().to("cpu", copy=True) for k, v in self.causal_lm.state_dict().items()}

    def save_pretrained(self, path: str) -> None:
        with self._full_weights():
            if self.rank == 0:
                self.causal_lm.save_pretrained(path)


class TrainerGroup:
    """The trainer role: every DeepSpeed rank behind one verb each, in rank order, plus the placement
    group that holds their resources (killing the actors does not free it).

    Verbs: `sft`, `train` (K minibatch updates of one generation batch, figures merged over ranks),
    `publish` (weights to the rollout workers), `save` / `load` (checkpoints), `save_pretrained`,
    `shutdown`. Every verb runs on every rank, because ZeRO gathers and each backward are collectives.
    """

    def __init__(self, recipe: Recipe, ranks: list, group):
        self.recipe, self.ranks, self.group = recipe, ranks, group

    @classmethod
    def start(cls, recipe: Recipe, model_dir: str) -> TrainerGroup:
        """`trainer.num_ranks` rank actors in one placement group (packed onto as few nodes as fit),
        joined into a process group whose rank 0 listens on its own node. A DeepSpeed config the engine
        rejects is a RecipeError naming the bad key, with the ranks freed (as they are when a rank cannot
        import the loss)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options, size = recipe.resources.trainer.ray_options(), recipe.trainer.num_ranks
        bundle = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}
        group = placement_group([{k: v for k, v in bundle.items() if v}] * size, strategy="PACK")
        ray.get(group.ready())
        actor = Trainer.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(group))
        a, run = recipe.algorithm, recipe.run
        trainers = cls(recipe, [actor.remote(model_dir, r, size, trainer=recipe.trainer, optim=recipe.optim,
                                             loss=a.loss_section(), correction=a.correction_section(),
                                             old_logprobs=a.old_logprobs, routing_replay=a.routing_replay,
                                             sft_lr=recipe.sft.lr,
                                             seed=run.seed, threads=run.threads, search=recipe.search_dirs(),
                                             total_updates=run.max_steps * a.updates_per_batch)
                                for r in range(size)], group)
        try:
            addr, port = ray.get(trainers.ranks[0].address.remote())
            trainers._all("init", addr, port)
        except ray.exceptions.RayTaskError as e:
            trainers.shutdown()
            if type(e.cause).__name__ == "ValidationError":  # DeepSpeed's pydantic config check
                problems = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in e.cause.errors())
                raise RecipeError(f"trainer.deepspeed is not a valid DeepSpeed config ({e.cause.title}): "
                                  f"{problems}") from None
            raise
        return trainers

    def _all(self, method: str, *args) -> list:
        """`method(*args)` on every rank at once; their results in rank order."""
        return ray.get([getattr(rank, method).remote(*args) for rank in self.ranks])

    def sft(self, batch: TrainBatch) -> float:
        """One supervised step on every row of `batch` (token-mean cross-entropy); the loss."""
        plan, _ = shard(batch, torch.arange(len(batch.lengths)), "token", len(self.ranks), self.recipe.trainer)
        return sum(out["loss"] for out in ray.get([r.sft_step.remote(p) for r, p in zip(self.ranks, plan)]))

    def train(self, batch: TrainBatch, step: int) -> dict:
        """K off-policy updates (algorithm.updates_per_batch), each a minibatch of whole prompt groups split
        over ranks and length-bucketed micro-batches; the ranks' figures merged into one row."""
        a, counts, plans = self.recipe.algorithm, Counter(), []
        for rows in minibatches(batch.group_index, a.updates_per_batch, derive_seed(self.recipe.run.seed, step, "minibatches")):
            plan, tokens = shard(batch, rows, a.normalization, len(self.ranks), self.recipe.trainer)
            plans.append(plan)
            counts.update(tokens)
        first_update = (step - 1) * a.updates_per_batch  # the step's place on the learning-rate schedule
        stats = ray.get([rank.train_batch.remote([p[r] for p in plans], self.recipe.rollout.temperature, first_update)
                         for r, rank in enumerate(self.ranks)])
        return {**merge_rank_figures(stats), "updates": len(plans),
                "padding_fraction": 1 - counts["real_tokens"] / counts["padded_tokens"],
                # The share of fed input tokens whose experts the trainer replays (the rest it routes itself).
                **({} if batch.routing is None else {"routing_replayed_fraction": float(
                    (batch.routing[..., 0, 0] >= 0).sum() / (batch.lengths - 1).sum())}),
                # Weights of version step - 1 are the ones this step trains from.
                **staleness_histogram(batch.versions, batch.loss_mask, current_version=step - 1)}

    def _weights(self):
        # Every rank takes part (ZeRO-3 gathers); rank 0's copy is the one returned.
        return [rank.state_dict.remote() for rank in self.ranks][0]

    def publish(self, rollout, version: int) -> None:
        """The current weights to every rollout worker, tagged `version`: trainer -> object store ->
        workers, never through the controller."""
        rollout.update_weights(self._weights(), version)

    def state_dict(self) -> dict:
        """The current full weights, on the controller's CPU."""
        return ray.get(self._weights())

    def save(self, path: str) -> None:
        self._all("save_checkpoint", str(path))

    def load(self, path: str) -> None:
        self._all("load_checkpoint", str(path))

    def save_pretrained(self, path: str) -> None:
        self._all("save_pretrained", str(path))

    def nodes(self) -> list[str]:
        return self._all("node")

    @classmethod
    @contextmanager
    def running(cls, recipe: Recipe, model_dir: str):
        """`start`, then `shutdown` however the block ends."""
        trainers = cls.start(recipe, model_dir)
        try:
            yield trainers
        finally:
            trainers.shutdown()

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.group)


def merge_rank_figures(stats: list[dict]) -> dict:
    """One metrics row from every rank's `train_batch` figures. Losses are shares of one sum; grad norm,
    skips and lr are the same on every rank; the counts of fork tokens by id (`ppo_zeroed_tokens`) add
    up; the rest are token means, weighted by each rank's tokens (absent on a rank whose responses were
    all masked)."""
    stats = [dict(s) for s in stats]
    out = {"loss": sum(s.pop("loss") for s in stats), **{k: stats[0].pop(k) for k in ("grad_norm", "skipped_steps", "lr")},
           "ppo_zeroed_tokens": sum((s.pop("ppo_zeroed_tokens", Counter()) for s in stats), Counter())}
    tokens = [s.pop("tokens") for s in stats]
    if any("is_weight_max" in s for s in stats):
        out["is_weight_max"] = max(s.pop("is_weight_max") for s in stats if "is_weight_max" in s)
    for k in dict.fromkeys(k for s in stats for k in s if k not in out):  # in a stable order
        out[k] = sum(s.get(k, 0.0) * n for s, n in zip(stats, tokens)) / max(sum(tokens), 1)
    return out
