"""The MoE routing replay experiment (R3; issue 19): train/inference mismatch with bf16 rollout weights against
the fp32 trainer, with the trainer routing each token itself and with it replaying the rollout's experts.

- rollout: `rollout.engine.CispoEngine` on the model loaded in bf16 (`rollout.dtype: bf16`), the trainer's fp32
  weights published into it as every step does, recording each token's experts (`algorithm.routing_replay`).
- trainer: `cispo.trainer.LogprobModel` on the fp32 model over exactly those responses, once routed by its own
  routers and once replaying the recorded experts (rollout.routing.RoutingReplay), as the trainer ranks do.

Per variant it reports the figures every metrics row carries (cispo.corrections.mismatch_figures):
KL(μ‖π) by the k3 estimator and the p99 of |Δ log π| over response tokens, and their mean |Δ log π|; and the
share of (token, MoE layer) choices where the trainer's own top-k differs from the rollout's (`routing_differs`).

    python experiments/routing_replay.py [--model DIR] [--preset tiny] [--num-prompts 64] [--n 4]
        [--max-new-tokens 32] [--threads 1]

Without --model, a fresh random `--preset` MoE (MiniMax `tiny`, or `tiny-qwen3_5_moe`). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.corrections import mismatch_figures  # noqa: E402
from cispo.trainer import LogprobModel  # noqa: E402
from experiments.fp32_head import model_and_requests, rollout, sampling_args, trainer_logprobs  # noqa: E402
from rollout.model import load_model, load_tokenizer  # noqa: E402
from rollout.routing import RoutingRecorder, RoutingReplay, routing_rows  # noqa: E402
from rollout.trajectory import Request  # noqa: E402


def measure(model_dir: str | Path, requests: list[Request], body_dtype: torch.dtype = torch.bfloat16) -> dict:
    """{"own_routing": figures, "replayed": figures} of the fp32 trainer against a `body_dtype` rollout of
    `requests`, plus `routing_differs` under "own_routing" (see the module docstring)."""
    tok = load_tokenizer(model_dir)
    trainer = LogprobModel(load_model(model_dir)).train()
    state = {k: v.detach().clone() for k, v in trainer.causal_lm.state_dict().items()}
    completions = rollout(model_dir, state, requests, body_dtype=body_dtype, head_dtype=torch.float32,
                          record_routing=True)
    mu = torch.tensor([lp for c in completions for lp in c.logprobs]).unsqueeze(0)
    ones = torch.ones_like(mu)
    recorder = RoutingRecorder(trainer.causal_lm)
    figures, rows = {}, len(completions)  # one forward over every row, so the recorder holds all of them
    for name, replay in (("own_routing", None), ("replayed", RoutingReplay(trainer.causal_lm))):
        pi = trainer_logprobs(trainer, completions, tok.eos_token_id, rows=rows, replay=replay).unsqueeze(0)
        f = mismatch_figures(pi, mu, ones, ones)
        figures[name] = {"mismatch_kl": f["mismatch_kl"], "mismatch_logprob_p99": f["mismatch_logprob_p99"],
                         "mean_abs_logprob_diff": float((pi - mu).abs().mean())}
        if replay is None:  # the trainer's own top-k against the recorded one, per (token, MoE layer)
            own = recorder.take()
            recorded = routing_rows(completions, own.shape[0] // rows).flatten(0, 1)
            on = recorded[:, 0, 0] >= 0
            differs = (own[on].sort(-1).values != recorded[on].sort(-1).values).any(-1)
            figures[name]["routing_differs"] = float(differs.double().mean())
    figures["tokens"] = mu.shape[1]
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sampling_args(ap, num_prompts=64, n=4, max_new_tokens=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with model_and_requests(args) as (model_dir, requests):
        figures = measure(model_dir, requests)
    print(json.dumps({"model": args.model or f"random {args.preset} (seed {args.seed})", "rollout_dtype": "bf16",
                      "trainer_dtype": "fp32", "prompts": len(requests), "n": args.n,
                      "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                      "threads": args.threads, **figures, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
