"""The trainer: one Ray actor per DeepSpeed rank (gloo on CPU), running SFT and CISPO updates."""
from __future__ import annotations

import math
import os

import ray
import torch

from cispo.config import Recipe
from cispo.loss import loss_metrics, policy_loss
from rollout.model import load_model, token_logprobs


def deepspeed_config(recipe: Recipe, micro_batch: int, world_size: int) -> dict:
    t, o = recipe.trainer, recipe.optim
    base = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # The client torch AdamW keeps M1's eps=1e-15 and avoids compiling fused_adam (DESIGN §5).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    return {**base, **t.deepspeed}


@ray.remote
class Trainer:
    def __init__(self, recipe_json: str, model_dir: str, rank: int, world_size: int, master_port: int):
        self.recipe = Recipe.model_validate_json(recipe_json)
        if self.recipe.trainer.zero_stage == 3:
            raise NotImplementedError("trainer.zero_stage=3 is not supported yet: the fp32 head reads lm_head.weight "
                                      "outside the module's forward, where ZeRO-3 has not gathered it; use 0-2")
        self.rank = rank
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(master_port), DS_ACCELERATOR="cpu")
        # Ray pins actors to one thread; phases run one at a time, so let the active one use every core.
        torch.set_num_threads(self.recipe.run.threads or os.cpu_count())
        torch.manual_seed(self.recipe.run.seed + rank)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        model = load_model(model_dir)
        model.train()
        o = self.recipe.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(self.recipe, self.recipe.trainer.micro_batch_size, world_size))
        self.skipped_steps = 0
        self.rl_updates = 0  # drives the linear warm-up of the RL learning rate

    def _forward_logprobs(self, input_ids: torch.Tensor, temperature: float = 1.0):
        hidden = self.engine.module.model(input_ids=input_ids).last_hidden_state[:, :-1]
        return token_logprobs(hidden, self.engine.module.lm_head.weight, input_ids[:, 1:], temperature=temperature)

    def _step(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        # ZeRO skips an update whose gradient norm is not finite; count it (DESIGN §9 saw NaN grads).
        if not math.isfinite(norm):
            self.skipped_steps += 1
        return norm

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def sft_step(self, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> dict:
        self._set_lr(self.recipe.sft.lr)
        logp, _ = self._forward_logprobs(input_ids)
        loss = -(logp * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        return {"loss": loss.item(), "grad_norm": self._step(loss)}

    def train_batch(self, batch: dict, updates: int, seed: int) -> dict:
        """K minibatch updates of the CISPO loss over one generation batch (M1 §3.1: off-policy updates)."""
        a, rows = self.recipe.algorithm, batch["input_ids"].shape[0]
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        stats: dict[str, list[float]] = {}
        for part in order.chunk(min(updates, rows)):
            o = self.recipe.optim
            self._set_lr(o.lr * min(1.0, (self.rl_updates + 1) / max(o.warmup_steps, 1)))
            self.rl_updates += 1
            mb = {k: v[part] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            mask = mb["loss_mask"]
            logp, entropy = self._forward_logprobs(mb["input_ids"], batch.get("temperature", 1.0))
            loss = policy_loss(a.name, logp, mb["old_logprobs"], mb["advantages"], mask, eps_high=a.eps_high,
                               eps_low=a.eps_low, normalization=a.normalization, group_index=mb["group_index"])
            figures = loss_metrics(logp, mb["old_logprobs"], mb["advantages"], mask, entropy,
                                   eps_high=a.eps_high, eps_low=a.eps_low)
            for key, value in {"loss": loss.item(), **figures}.items():
                stats.setdefault(key, []).append(value)
            stats.setdefault("grad_norm", []).append(self._step(loss))
        out = {k: (max(v) if k == "is_weight_max" else sum(v) / len(v)) for k, v in stats.items()}
        out["skipped_steps"] = self.skipped_steps
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def save_checkpoint(self, path: str) -> None:
        # Prefixed: DeepSpeed keeps its own 'skipped_steps' and drops clashing client keys on load.
        counters = {"cispo_rl_updates": self.rl_updates, "cispo_skipped_steps": self.skipped_steps}
        self.engine.save_checkpoint(path, tag="state", client_state=counters, save_latest=False)

    def load_checkpoint(self, path: str) -> None:
        _, counters = self.engine.load_checkpoint(path, tag="state")
        self.rl_updates, self.skipped_steps = counters["cispo_rl_updates"], counters["cispo_skipped_steps"]

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _full_weights(self):
        """Whole parameters on every rank; ZeRO-3 partitions them, so gather first (a collective:
        every rank must call the method that uses this)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        return deepspeed.zero.GatheredParameters(params, enabled=self.recipe.trainer.zero_stage == 3)

    def state_dict(self) -> dict:
        """The weights to publish; rank 0 returns them, the others only take part in the gather."""
        with self._full_weights():
            if self.rank != 0:
                return {}
            return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def save_pretrained(self, path: str) -> None:
        with self._full_weights():
            if self.rank == 0:
                self.engine.module.save_pretrained(path)
