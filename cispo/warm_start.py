"""The supervised warm start: cross-entropy on each prompt's demonstration, with the RL trainer itself.

A tiny random model gets no reward to learn from, so a recipe may first imitate demonstrations
(`Prompt.target`: the data's reference or demonstration, else the boxed answer). With
`sft.stop_at_accuracy` it ends once greedy eval accuracy reaches the target: when a small model's
accuracy jumps depends on thread count and numerics, the target does not.
"""
from __future__ import annotations

import time

from cispo.batching import pad_rows
from cispo.collect import Collector
from cispo.data import PromptSource


def warm_start(collector: Collector, source: PromptSource, trainers, rollout, stop) -> None:
    """Up to `sft.steps` supervised steps of `sft.batch_size` prompts (stream "sft"), evaluated every
    `sft.eval_every` steps; returns early when `stop.requested` (a signal) or the target is reached."""
    recipe, tok = collector.recipe, collector.tok
    s, t0 = recipe.sft, time.perf_counter()
    for step in range(1, s.steps + 1):
        if stop.requested:
            return
        rows = [(collector.encode(p), tok(p.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                for p in source.batch(step, s.batch_size, stream="sft")]
        loss = trainers.sft(pad_rows(rows, tok.eos_token_id))
        if step % s.eval_every == 0 or step == s.steps:
            trainers.publish(rollout, version=0)
            accuracy = collector.evaluate(source.eval) if s.stop_at_accuracy else float("nan")
            print(f"sft {step}/{s.steps} loss {loss:.4f} eval accuracy {accuracy:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if s.stop_at_accuracy and accuracy >= s.stop_at_accuracy:
                return
