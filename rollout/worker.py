"""Rollout on Ray: `RolloutWorker` actors each hold one model replica; `RolloutPool` spreads requests
over them, brings every one to a new weight version, and re-runs a dead worker's requests elsewhere."""
from __future__ import annotations

import os

import ray
import torch
from ray.exceptions import RayActorError

from rollout.engine import Completion, Request, generate
from rollout.model import load_model, load_tokenizer, use_decode_attention


@ray.remote
class RolloutWorker:
    def __init__(self, model_dir: str, pad_id: int, threads: int = 0, max_batch_rows: int = 256):
        # Ray sets OMP_NUM_THREADS=1 in actors; rollout and training alternate, so take every core.
        torch.set_num_threads(threads or os.cpu_count())
        self.model = load_model(model_dir).eval()
        use_decode_attention(self.model)
        self.pad_id, self.max_batch_rows = pad_id, max_batch_rows
        self.version = 0
        # Stop strings are matched on text, so the worker keeps the tokenizer saved beside the model.
        self.tokenizer = load_tokenizer(model_dir)

    def generate(self, requests: list[Request]) -> list[Completion]:
        return generate(self.model, requests, self.pad_id, self.version, self.max_batch_rows, decode=self._text)

    def _text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def update_weights(self, state_dict: dict, version: int) -> int:
        self.model.load_state_dict(state_dict)
        self.version = version
        return version

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def balance(requests: list[Request], workers: int) -> list[list[int]]:
    """Request indices per worker, longest work first onto the least-loaded worker.

    Work is estimated as samples x (prompt + budget) tokens. Which worker runs a request never
    changes its output (per-request seeds), only how long the slowest worker takes.
    """
    shares, loads = [[] for _ in range(workers)], [0] * workers
    cost = lambda i: requests[i].n * (len(requests[i].prompt_ids) + requests[i].params.max_new_tokens)
    for i in sorted(range(len(requests)), key=cost, reverse=True):
        w = loads.index(min(loads))
        shares[w].append(i)
        loads[w] += cost(i)
    return [sorted(share) for share in shares]


class RolloutPool:
    """The controller's handle on the rollout workers.

    A worker that dies (node lost, OOM, `ray.kill`) is dropped and its requests are re-run on the
    survivors, so a step finishes as long as one worker lives; `failures` counts the workers lost.
    """

    def __init__(self, workers: list):
        self.workers = list(workers)
        self.version = 0
        self.failures = 0

    @classmethod
    def start(cls, num_workers: int, model_dir: str, pad_id: int, threads: int = 0,
              max_batch_rows: int = 256, options: dict | None = None) -> RolloutPool:
        """`options` are Ray actor options (CPUs, GPUs, a node resource that places the workers)."""
        # Not waited on here, so that the caller's other actors start alongside (3-6 s each).
        actor = RolloutWorker.options(**(options or {}))
        return cls([actor.remote(model_dir, pad_id, threads, max_batch_rows) for _ in range(num_workers)])

    def submit(self, requests: list[Request]) -> Rollout:
        """Start generating `requests` on the workers and return at once; `.result()` waits."""
        return Rollout(self, requests)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in request order, then sample order, whichever workers ran them."""
        return self.submit(requests).result()

    def nodes(self) -> list[str]:
        """The Ray node of each worker."""
        return ray.get([w.node.remote() for w in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
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
        self.done: list[Completion] = []
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

    def result(self) -> list[Completion]:
        """Completions in request order, then sample order."""
        while self.running:
            [ref], _ = ray.wait(list(self.running), num_returns=1)
            worker, ids = self.running.pop(ref)
            try:
                completions = ray.get(ref)
            except RayActorError:
                self.pool._drop(worker)
                self._dispatch(ids)
                continue
            for c in completions:
                c.request_index = ids[c.request_index]
            self.done += completions
        return sorted(self.done, key=lambda c: (c.request_index, c.sample_index))
