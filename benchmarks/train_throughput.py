"""Training throughput: length-bucketed micro-batches vs fixed-size ones in arrival order; and the
time to publish weights to rollout workers.

One real DeepSpeed trainer actor (ZeRO-2, gloo) runs CISPO updates on the same long-tailed batch
twice per repeat, alternating: the baseline cuts `--micro-rows` rows at a time in arrival order,
each micro-batch padded to its own longest row (what a fixed per-device batch size does); ours sorts
by length and fills micro-batches up to the same padded-token bound (`--micro-rows` x the longest
allowed length), so neither holds more activations at once. Response lengths are log-normal
(median 128, sigma 1) clipped to [16, 1024] after a 16-token prompt. Tokens/s counts real tokens.

Then two RolloutWorkers receive the trainer's state dict through the object store, as each RL step
does (TrainerGroup.publish); we report seconds per MB of weights.

    python benchmarks/train_throughput.py [--repeats 3] [--rows 64] [--preset tiny] [--threads 2]

Prints one JSON line with medians and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ray
import torch

from cispo.batching import TrainBatch, pad_rows, shard
from cispo.config import load_recipe
from cispo.trainer import TrainerGroup
from rollout.config import RolloutConfig
from rollout.model import build_char_tokenizer, build_hybrid, save_model
from rollout.worker import RolloutPool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LEN, MAX_LEN, GROUP = 16, 1024, 8


def long_tailed_batch(rows: int, vocab: int, seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.log(torch.tensor(128.0)) + torch.randn(rows, generator=g)).clamp(16, MAX_LEN).int()
    sequences = [(torch.randint(4, vocab, (PROMPT_LEN,), generator=g).tolist(),
                  torch.randint(4, vocab, (int(n),), generator=g).tolist()) for n in lengths]
    batch = pad_rows(sequences, filler_id=1)
    batch.old_logprobs = torch.full_like(batch.loss_mask, -8.0) * batch.loss_mask
    batch.advantages = torch.randn(rows, generator=g)
    batch.group_index = torch.arange(rows) // GROUP
    return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--micro-rows", type=int, default=8)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    tok = build_char_tokenizer("".join(chr(c) for c in range(0x4E00, 0x4E00 + 2000)))  # a 2k-token vocabulary
    torch.manual_seed(0)
    model = build_hybrid(args.preset, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model_dir = tempfile.mkdtemp(prefix="train-throughput-")
    save_model(model, tok, model_dir)
    recipe = load_recipe(os.path.join(REPO, "recipes/tiny-arith.yaml"),
                         [f"run.threads={args.threads}", "algorithm.updates_per_batch=1", "optim.lr=1e-6"])
    trainers = TrainerGroup.start(recipe, model_dir)
    trainer = trainers.ranks[0]  # one rank: each mode's micro-batch plan is timed on its own
    batch = long_tailed_batch(args.rows, len(tok), seed=0)
    modes = {
        "naive": recipe.trainer.model_copy(update={"length_bucketing": False, "micro_batch_size": args.micro_rows}),
        "bucketed": recipe.trainer.model_copy(update={"length_bucketing": True, "micro_batch_size": args.rows,
                                                      "micro_batch_tokens": args.micro_rows * (PROMPT_LEN + MAX_LEN)}),
    }
    plans = {name: shard(batch, torch.arange(args.rows), "group", 1, cfg) for name, cfg in modes.items()}
    ray.get(trainer.train_batch.remote([plans["bucketed"][0][0]], 1.0, 0))  # warm-up (schedule position 0)
    seconds = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, (plan, _) in plans.items():
            t0 = time.perf_counter()
            ray.get(trainer.train_batch.remote([plan[0]], 1.0, 0))
            seconds[name].append(time.perf_counter() - t0)

    pool = RolloutPool.start(2, model_dir, tok.pad_token_id, RolloutConfig(threads=1))
    megabytes = sum(v.numel() * v.element_size() for v in trainers.state_dict().values()) / 2**20
    trainers.publish(pool, 0)  # warm-up: both workers are up
    publish = []
    for version in range(1, 6):
        t0 = time.perf_counter()
        trainers.publish(pool, version)  # gather, put, two loads
        publish.append(time.perf_counter() - t0)

    real = plans["naive"][1]["real_tokens"]
    rate = {name: real / statistics.median(s) for name, s in seconds.items()}
    lengths = sorted(batch.lengths.tolist())
    print(json.dumps({
        "rows": args.rows, "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1],
        "naive_padding_fraction": round(1 - real / plans["naive"][1]["padded_tokens"], 3),
        "bucketed_padding_fraction": round(1 - real / plans["bucketed"][1]["padded_tokens"], 3),
        "naive_micro_batches": len(plans["naive"][0][0]), "bucketed_micro_batches": len(plans["bucketed"][0][0]),
        "naive_tokens_per_s": round(rate["naive"], 1), "bucketed_tokens_per_s": round(rate["bucketed"], 1),
        "speedup": round(rate["bucketed"] / rate["naive"], 2),
        "weights_mb": round(megabytes, 1), "publish_workers": 2, "publish_s": round(statistics.median(publish), 4),
        "publish_ms_per_mb": round(1000 * statistics.median(publish) / megabytes, 2),
    }))
    trainers.shutdown()
    pool.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
