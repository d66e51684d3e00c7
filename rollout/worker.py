"""RolloutWorker: a Ray actor holding one model replica, generating and taking versioned weights."""
from __future__ import annotations

import os

import ray
import torch

from rollout.engine import Completion, Request, generate
from rollout.model import load_model


@ray.remote
class RolloutWorker:
    def __init__(self, model_dir: str, pad_id: int, threads: int = 0):
        # Ray sets OMP_NUM_THREADS=1 in actors; rollout and training alternate, so take every core.
        torch.set_num_threads(threads or os.cpu_count())
        self.model = load_model(model_dir).eval()
        self.pad_id = pad_id
        self.version = 0

    def generate(self, requests: list[Request]) -> list[Completion]:
        return generate(self.model, requests, self.pad_id, self.version)

    def update_weights(self, state_dict: dict, version: int) -> int:
        self.model.load_state_dict(state_dict)
        self.version = version
        return version
