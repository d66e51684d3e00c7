"""What a run owns besides its roles: its directory (config, starting model, checkpoints, summary), the
Ray start-up, and the stop request that turns SIGTERM/SIGINT into "finish the step, save, exit"."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
from concurrent.futures import Future
from pathlib import Path

from cispo import checkpoint
from cispo.config import Recipe, RecipeError, dump_recipe
from rewards.pool import signals_left_to_parent
from rollout.model import save_model, starting_model

ROLLOUTS = "rollouts.pkl"  # in a checkpoint: paused groups and the step collected ahead


class RunDir:
    """`run.dir`: config.yaml (the resolved recipe), metrics.jsonl, summary.json, ckpt/step-N/ (every
    rank's DeepSpeed state and the controller's), init/ (the starting model and tokenizer every actor
    loads) and final/ (the trained model and tokenizer)."""

    def __init__(self, recipe: Recipe):
        """Refuses to reuse a dir that holds a run unless resuming; with run.resume, finds the newest
        complete checkpoint (`resume_from`) or refuses. A reward, a loss or a rollout function that cannot
        load is refused here too, before a model is built or Ray started."""
        recipe.rewards()
        recipe.loss()
        recipe.rollout_function()
        self.recipe, self.path = recipe, Path(recipe.run.dir)
        found = checkpoint.latest(self.path) if recipe.run.resume else None
        if recipe.run.resume and found is None:
            raise RecipeError(f"run.resume=true but {self.path} holds no complete checkpoint")
        if not recipe.run.resume and (self.path / "metrics.jsonl").exists():
            raise RecipeError(f"run.dir {self.path} already holds a run; resume it with run.resume=true, "
                              f"or choose another run.dir")
        self.resume_from: Path | None = found[0] if found else None
        self.path.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, self.path / "config.yaml")

    def starting_model(self) -> str:
        """The model dir init/, written from the recipe's model section on a fresh run; on resume the
        checkpoint holds the weights and init/ the architecture and tokenizer."""
        model_dir = self.path / "init"
        if self.resume_from is None:
            try:
                model, tok = starting_model(self.recipe.model)
            except (FileNotFoundError, ValueError) as exc:  # a missing model.path
                raise RecipeError(f"{self.recipe.where('model.path')}: {exc}") from None
            save_model(model, tok, model_dir)
        return str(model_dir)

    def save(self, trainers, step: int, eval_accuracy_start: float, collector=None, pending=None,
             source=None) -> None:
        """A checkpoint of every rank and the controller's step (written aside, fsynced, renamed), with
        what the collector holds across steps: the groups paused mid-response (partial rollouts) and the
        next step, already collected (rollout.overlap). Prompts read whole are drawn by step, so the step
        is their data position; a streamed source's position (`PromptSource.position`) is saved beside it,
        after the step collected ahead has drawn."""
        staging = checkpoint.staging_dir(self.path, step)
        trainers.save(staging)
        buffered = pending and (pending.result(), pending.window, pending.reason)  # waits for it to finish
        if collector is not None and (collector.paused or buffered):
            (staging / ROLLOUTS).write_bytes(pickle.dumps({"paused": collector.paused, "next_step": buffered}))
        checkpoint.commit(staging, {"step": step, "eval_accuracy_start": eval_accuracy_start,
                                    "data_position": source.position() if source else {}}, self.recipe.run.keep_last)

    def restore(self, trainers, collector, log, source):
        """Every rank restored from `resume_from`, its weights republished, the collector's paused groups
        put back, the prompt source moved to its data position, metrics rows logged after it dropped; returns (eval accuracy before RL, the first step
        to run, that step's collection if the checkpoint holds it, as a finished PendingStep, else None)."""
        from cispo.collect import PendingStep
        from cispo.metrics import Timer

        state = json.loads((self.resume_from / checkpoint.MARKER).read_text())
        trainers.load(self.resume_from)
        trainers.publish(collector.rollout, version=state["step"])
        log.truncate(state["step"])
        source.seek(state.get("data_position", {}))
        pending = None
        if (self.resume_from / ROLLOUTS).exists():
            held = pickle.loads((self.resume_from / ROLLOUTS).read_bytes())
            collector.paused = held["paused"]
            if held["next_step"]:
                result, window, reason = held["next_step"]
                future = Future()
                future.set_result(result)
                pending = PendingStep(future, window, reason, Timer(f"step {state['step'] + 1}"))
        print(f"resumed from {self.resume_from} (step {state['step']})", flush=True)
        return state["eval_accuracy_start"], state["step"] + 1, pending

    def finish(self, trainers, tok, summary: dict) -> None:
        trainers.save_pretrained(self.path / "final")
        tok.save_pretrained(self.path / "final")
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))


def start_ray(recipe: Recipe) -> None:
    """Join the cluster at RAY_ADDRESS (launch/ray-cluster.sh, tests), or start a local Ray sized for the
    recipe's actors. A local Ray's processes (GCS, raylet, agents, the actors' workers) block SIGINT and
    SIGTERM sent to the whole process group, so that a Ctrl-C or a preemption ends the run with a
    checkpoint rather than with a dead GCS; the controller shuts them down at exit (ray.shutdown, SIGKILL)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        actors = (0 if recipe.resources.colocate else recipe.rollout.num_workers) + recipe.trainer.num_ranks
        with signals_left_to_parent():
            ray.init(include_dashboard=False, num_cpus=max(os.cpu_count(), actors), log_to_driver=True)
        _shutdown_without_sigterm(ray._private.worker._global_node)


def _shutdown_without_sigterm(node) -> None:
    """Make ray.shutdown SIGKILL the local Ray's daemons at once. It sends each of them SIGTERM and waits 1 s
    before its SIGKILL, but start_ray blocks their SIGTERM, so the waits only add 5 s to every run's exit
    (5.3 s against 0.3 s, measured here). The raylet's own children (the dashboard agent, the actors'
    workers) are killed with it: without the raylet's graceful exit the agent would wait for a dead GCS."""
    import psutil

    kill_all = node.kill_all_processes

    def at_once(**how):
        children = []
        for info in node.all_processes.get("raylet", []):
            with contextlib.suppress(psutil.NoSuchProcess):
                children += psutil.Process(info.process.pid).children(recursive=True)
        kill_all(**{**how, "allow_graceful": False})
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    node.kill_all_processes = at_once


class StopRequest:
    """SIGTERM/SIGINT end the run after the current step, with a checkpoint, instead of losing it."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        # os.write, not print: a signal that lands inside a print would make print re-enter itself.
        os.write(sys.stdout.fileno(), f"{self.requested}: finishing step, then saving a checkpoint\n".encode())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
