"""Reward functions as users write them, for the plugin tests (imported by name in worker processes)."""
import asyncio
import time

from rewards.plugins import batched


def exact(response, answer):
    return float(response.strip() == answer)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):  # verl, unchanged
    return {"score": float(ground_truth in solution_str), "data_source": data_source}


def trl_length(prompts, completions, **kwargs):  # TRL, unchanged
    return [float(len(c) == len(s)) for c, s in zip(completions, kwargs["solution"])]


async def async_exact(response, answer):
    await asyncio.sleep(0)
    return float(response == answer)


@batched
def batch_exact(responses, answers):
    return [float(r == a) for r, a in zip(responses, answers)]


def raises(response, answer):
    raise KeyError("no such column")


def hangs(response, answer):
    time.sleep(3600)


def suicide(response, answer):
    import os
    os._exit(3)
