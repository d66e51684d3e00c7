"""Rollout on Ray: `RolloutWorker` actors each hold one model replica (or trainer ranks host one each,
`RolloutPool.hosted`); `RolloutPool` spreads requests over them, brings every one to a new weight version,
and re-runs a dead worker's requests elsewhere."""
from __future__ import annotations

import os
import time

import ray
import torch
from ray.exceptions import RayActorError

from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.hf_engine import HFGenerateEngine
from rollout.model import load_model, load_tokenizer
from rollout.trajectory import Request, Trajectory
from rollout.vllm_engine import VLLMEngine

# Rollout engines by recipe name (`rollout.engine`, whose Literal in rollout.config lists the same names).
ENGINES = {"cispo": CispoEngine, "hf": HFGenerateEngine, "vllm": VLLMEngine}


class Replica:
    """One model replica behind the engine that `config.engine` names, in whichever process holds it: a
    `RolloutWorker` actor of its own, or a trainer rank that hosts it (`resources.colocate`).

    It runs on the first GPU Ray gives it (`resources.rollout.gpus`, fractions included) and on the CPU
    otherwise, with weights in `config.dtype` (auto: bf16 on a GPU, fp32 on CPU). To add an engine,
    subclass rollout.engine.Engine with its `generate(requests) -> trajectories` (rollout.engine.CispoEngine
    and rollout.hf_engine.HFGenerateEngine are the two there are), and register it with one line in
    ENGINES and its name in rollout.config's `engine`; recipes then choose it by `rollout.engine`.
    """

    def __init__(self, model_dir: str, pad_id: int, config: RolloutConfig, record_routing: bool = False):
        # Ray sets OMP_NUM_THREADS=1 in actors; rollout and training alternate, so take every core.
        torch.set_num_threads(config.threads or os.cpu_count())
        # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPUs, so the first visible one is ours. The
        # in-process stand-in for Ray on the GPU test machine (../shared/gpu) has no get_gpu_ids: there the
        # one process holds every visible GPU.
        gpu_ids = ray.get_gpu_ids() if hasattr(ray, "get_gpu_ids") else range(torch.cuda.device_count())
        gpu = bool(gpu_ids) and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        dtype = torch.bfloat16 if config.dtype == "bf16" or (config.dtype == "auto" and gpu) else torch.float32
        t0 = time.perf_counter()
        model = load_model(model_dir, dtype=dtype, device=self.device)
        # Stop strings are matched on text, so the engine gets the tokenizer saved beside the model.
        extra = {"record_routing": True} if record_routing else {}  # only our engine records (MoE routing replay)
        self.engine = ENGINES[config.engine](model, config, pad_id, load_tokenizer(model_dir), **extra)
        self.start_s = time.perf_counter() - t0  # model load and engine start-up (vLLM's is seconds)

    def generate(self, requests: list[Request]) -> list[Trajectory]:
        return self.engine.generate(requests)

    def update_weights(self, state_dict: dict, version: int) -> int:
        self.engine.load_weights(state_dict, version)
        return version

    def start_seconds(self) -> float:
        return self.start_s

    def placement(self) -> str:
        """The device this worker's model sits on, e.g. "cuda:0" or "cpu"."""
        return str(self.device)


@ray.remote
class RolloutWorker(Replica):
    """A replica in a Ray actor of its own."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def balance(requests: list[Request], workers: int) -> list[list[int]]:
    """Request indices per worker, longest work first onto the least-loaded worker.

    Work is estimated as samples x (prompt + budget) tokens. Which worker runs a request never
    changes its output (per-request seeds), only how long the slowest worker takes. A request that
    names a session goes to worker `session % workers`, where that session's state is kept.
    """
    shares, loads = [[] for _ in range(workers)], [0] * workers
    cost = lambda i: requests[i].n * (len(requests[i].prompt_ids) + requests[i].params.max_new_tokens)
    for i in sorted(range(len(requests)), key=cost, reverse=True):
        session = requests[i].session
        w = loads.index(min(loads)) if session is None else session % workers
        shares[w].append(i)
        loads[w] += cost(i)
    return [sorted(share) for share in shares]


class RolloutPool:
    """The controller's handle on the rollout workers.

    A worker that dies (node lost, OOM, `ray.kill`) is dropped and its requests are re-run on the
    survivors, so a step finishes as long as one worker lives; `failures` counts the workers lost.
    """

    def __init__(self, workers: list, owned: bool = True):
        self.workers = list(workers)
        self.owned = owned  # False: the workers are hosts of replicas (`hosted`), ended by whoever started them
        self.version = 0
        self.failures = 0

    @classmethod
    def start(cls, num_workers: int, model_dir: str, pad_id: int, config: RolloutConfig,
              options: dict | None = None, record_routing: bool = False) -> RolloutPool:
        """`config` picks each worker's engine, dtype, threads and batch rows; `options` are Ray actor
        options (CPUs, GPUs, a node resource that places the workers); `record_routing` has the engine
        (rollout.engine.CispoEngine) record each token's MoE experts for routing replay."""
        # Not waited on here, so that the caller's other actors start alongside (3-6 s each).
        actor = RolloutWorker.options(**(options or {}))
        return cls([actor.remote(model_dir, pad_id, config, record_routing) for _ in range(num_workers)])

    @classmethod
    def hosted(cls, hosts: list, model_dir: str, pad_id: int, config: RolloutConfig,
               record_routing: bool = False) -> RolloutPool:
        """A pool over actors that each build a `Replica` inside themselves (`host_rollout`, the same
        arguments as `start`) and serve its `generate`, `update_weights` and `start_seconds`, plus `node`:
        the trainer ranks under `resources.colocate` (cispo.trainer.Trainer). Shutting the pool down leaves
        the hosts running."""
        ray.get([host.host_rollout.remote(model_dir, pad_id, config, record_routing) for host in hosts])
        return cls(hosts, owned=False)

    def submit(self, requests: list[Request]) -> Rollout:
        """Start generating `requests` on the workers and return at once; `.result()` waits."""
        return Rollout(self, requests)

    def generate(self, requests: list[Request]) -> list[Trajectory]:
        """Trajectories in request order, then sample order, whichever workers ran them."""
        return self.submit(requests).result()

    def start_seconds(self) -> float:
        """The slowest worker's start-up: model load plus engine start, in seconds (metrics: time_rollout_start_s,
        named as a time so that rows compared across a resume leave it out, as they leave out every timer)."""
        return max(ray.get([w.start_seconds.remote() for w in self.workers]))

    def nodes(self) -> list[str]:
        """The Ray node of each worker."""
        return ray.get([w.node.remote() for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers if self.owned else ():
            ray.kill(worker)

    def update_weights(self, state_dict, version: int) -> None:
        """Load new weights (a state dict or its ObjectRef) on every live worker, tagged `version`."""
        refs = [(w, w.update_weights.remote(state_dict, version)) for w in self.workers]
        for worker, ref in refs:
            try:
                ray.get(ref)
            except RayActorError:
                self._drop(worker)
        self.version = version

    def _drop(self, worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            self.failures += 1


class Rollout:
    """Requests in flight on a pool: spread over the live workers at once (longest work first onto the
    least loaded); `result()` collects them, re-running a dead worker's share on the survivors."""

    def __init__(self, pool: RolloutPool, requests: list[Request]):
        self.pool, self.requests = pool, requests
        self.running: dict = {}  # ObjectRef -> (worker, request indices)
        self.done: dict[int, list[Trajectory]] = {}  # request index -> its n samples
        self._dispatch(list(range(len(requests))))

    def _dispatch(self, todo: list[int]) -> None:
        if not todo:
            return
        if not self.pool.workers:
            raise RuntimeError(f"every rollout worker died ({self.pool.failures} lost)")
        shares = balance([self.requests[i] for i in todo], len(self.pool.workers))
        for worker, share in zip(self.pool.workers, shares):
            if share:
                ids = [todo[j] for j in share]
                self.running[worker.generate.remote([self.requests[i] for i in ids])] = (worker, ids)

    def result(self) -> list[Trajectory]:
        """Trajectories in request order, then sample order."""
        while self.running:
            [ref], _ = ray.wait(list(self.running), num_returns=1)
            worker, ids = self.running.pop(ref)
            try:
                flat = iter(ray.get(ref))
            except RayActorError:
                self.pool._drop(worker)
                self._dispatch(ids)
                continue
            self.done.update({i: [next(flat) for _ in range(self.requests[i].n)] for i in ids})
        return [t for i in range(len(self.requests)) for t in self.done[i]]
