"""The controller: one RL step per iteration, each phase one call on a role object.

    1-3. prompts -> rollout -> rewards    Collector.submit       (cispo.collect; rollout.function, refill)
    4.   advantages                       rl_batch               (cispo.batching)
    5.   train                            TrainerGroup.train     (cispo.trainer; DeepSpeed ranks)
    6.   sync                             TrainerGroup.publish   (weights -> RolloutPool)
    7.   record                           MetricsLog.log, RunDir.save
"""
from __future__ import annotations

import time
from contextlib import ExitStack

from cispo.batching import rl_batch
from cispo.collect import rollout_metrics, running_collector
from cispo.config import Recipe
from cispo.data import PromptSource
from cispo.metrics import MetricsLog, Timer, read_metrics, time_medians, top_tokens
from cispo.run import RunDir, StopRequest, start_ray
from cispo.stages import advance
from cispo.trainer import TrainerGroup
from cispo.warm_start import warm_start
from rewards.sandbox import isolation as sandbox_isolation


def train(recipe: Recipe) -> dict:
    with ExitStack() as cleanup:  # every role is shut down however the run ends
        t0, run = time.perf_counter(), RunDir(recipe)
        source = PromptSource(recipe.data, recipe.run.seed)
        model_dir = run.starting_model()
        start_ray(recipe)
        # resources.colocate: the trainer ranks host the rollout replicas, so they start first
        hosts = cleanup.enter_context(TrainerGroup.running(recipe, model_dir)) if recipe.resources.colocate else None
        collector = cleanup.enter_context(running_collector(recipe, model_dir, hosts and hosts.ranks))  # rollout, scorers
        rollout, tok = collector.rollout, collector.tok
        trainers = hosts or cleanup.enter_context(TrainerGroup.running(recipe, model_dir))
        print(f"placement: rollout workers on nodes {sorted(set(rollout.nodes()))}, "
              f"trainer ranks on nodes {sorted(set(trainers.nodes()))}", flush=True)
        log = MetricsLog(run.path, recipe, {"data_rows_skipped": sum(source.skipped.values()),
                                            "time_rollout_start_s": rollout.start_seconds(), **(
            {"sandbox_isolation": sandbox_isolation(recipe.reward.min_isolation)} if recipe.uses_sandbox() else {})})
        cleanup.callback(log.close)
        stop = StopRequest()
        cleanup.callback(stop.restore)

        pending = None  # a step collected ahead (rollout.overlap), restored from the checkpoint on resume
        if run.resume_from:
            acc_start, first_step, pending = run.restore(trainers, collector, log, source)
        else:
            if recipe.sft.steps:
                warm_start(collector, source, trainers, rollout, stop)
            if stop.requested:  # no RL step ran, so there is nothing to checkpoint yet
                print(f"stopped by {stop.requested} during the warm start; nothing to resume", flush=True)
                return {"interrupted": stop.requested, "steps": 0}
            acc_start, first_step = collector.evaluate(source.eval), 1
        print(f"eval accuracy before RL: {acc_start:.3f}", flush=True)
        rows = read_metrics(run.path) if run.resume_from else []

        def collect(step: int):  # 1-3. prompts -> rollout -> rewards, on the collector's thread
            window, reason = (advance(rows, recipe.stages) if recipe.stages.windows
                              else (recipe.rollout.max_new_tokens, None))
            return collector.submit(step, source, window, Timer(f"step {step}"), reason)

        for step in range(first_step, recipe.run.max_steps + 1):
            began, pending = time.perf_counter(), pending or collect(step)
            (first, groups, sampling), timer = pending.result(), pending.timer
            timer.start = began  # a step's wall time runs from the end of the one before, even if it collected during it
            max_new_tokens, reason, pending = pending.window, pending.reason, None
            if reason:
                print(f"stage: window -> {max_new_tokens} tokens ({reason})", flush=True)
            if recipe.rollout.overlap and step < recipe.run.max_steps:
                # Asynchronous: step + 1 generates while this step trains, from the weights before it (its
                # tokens one version older, as their versions record); its stage window sees rows up to step - 1.
                pending = collect(step + 1)
            stats = {}
            if groups:
                batch = rl_batch(groups, recipe.algorithm, max_new_tokens, tok.eos_token_id)  # 4. advantages
                with timer("train"):
                    stats = trainers.train(batch, step)                                 # 5. train
                stats["ppo_zeroed_tokens"] = top_tokens(stats.get("ppo_zeroed_tokens", {}), tok)
            if pending:  # all of step + 1 is sampled before new weights land: its versions are step - 1
                pending.result()
            with timer("sync"):  # every step, trained or not, so that version t is always step t's weights
                trainers.publish(rollout, version=step)                                 # 6. sync
            evaluated, every = {}, recipe.run.eval_every  # held-out accuracy of the weights just published
            if not stop.requested and (step == recipe.run.max_steps or every and step % every == 0):
                with timer("eval"):
                    evaluated["eval_accuracy"] = collector.evaluate(source.eval)
                evaluated["eval_unscored"] = collector.unscored  # so far in this process: errors never count as fails
            rows.append(log.log({"step": step, "window": max_new_tokens, "stage_reason": reason,  # 7. record
                                 **rollout_metrics(first), **sampling, **stats, **evaluated,
                                 "rollout_worker_failures": rollout.failures, **timer.seconds()}))
            if step % recipe.run.save_every == 0 or step == recipe.run.max_steps or stop.requested:
                run.save(trainers, step, acc_start, collector, pending, source)
            if stop.requested:
                print(f"stopped by {stop.requested} after step {step}; resume with run.resume=true", flush=True)
                return {"interrupted": stop.requested, "steps": step}

        # Measured in the last step's row, unless that step was logged before a stop and resumed.
        acc_end = rows[-1]["eval_accuracy"] if rows and "eval_accuracy" in rows[-1] else collector.evaluate(source.eval)
        summary = {"eval_accuracy_start": acc_start, "eval_accuracy_end": acc_end, "steps": recipe.run.max_steps,
                   "eval_unscored": collector.unscored,
                   "wall_s": time.perf_counter() - t0, **time_medians(rows)}
        run.finish(trainers, tok, summary)
    print(f"done: eval accuracy {acc_start:.3f} -> {acc_end:.3f} ({acc_end - acc_start:+.3f} on {len(source.eval)} "
          f"held-out prompts) in {summary['wall_s']:.0f}s ({recipe.run.max_steps} steps), run dir {run.path}", flush=True)
    return summary
