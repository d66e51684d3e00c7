"""Reward functions as users write them, for the plugin tests (imported by name in worker processes).

The TRL and verl functions are written as those projects document them, unchanged."""
import asyncio
import math
import time

from rewards.plugins import batched


def exact(response, answer):
    return float(response.strip() == answer)


def exact_other_names(text, gold):  # ours, with parameter names of its own
    return float(text.strip() == gold)


def prompt_echo(prompt, response, answer):  # ours, reading the prompt by name
    return float(response == prompt[::-1])


def compute_score(data_source, solution_str, ground_truth, extra_info=None):  # verl
    bonus = 0.5 if data_source == "gsm8k" and (extra_info or {}).get("split") == "train" else 0.0
    return {"score": float(ground_truth in solution_str) + bonus, "data_source": data_source}


def compute_score_kwonly(data_source, solution_str, ground_truth, *, extra_info):  # verl, keyword-only extra_info
    return float(ground_truth in solution_str) * extra_info["weight"]


def trl_length(completions, **kwargs):  # TRL's docs: a reward on completions only
    return [-abs(20 - len(c)) / 20 for c in completions]


def trl_accuracy(completions, solution, **kwargs):  # TRL's docs: a dataset column by name
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


def trl_ids(prompts, completions, completion_ids, **kwargs):  # TRL's docs: token ids and prompts
    return [len(ids) / (1 + len(p)) for p, ids in zip(prompts, completion_ids)]


def trl_difficulty(completions, **kwargs):  # TRL: any column arrives as a keyword list
    return [d * float(c.strip() == a) for c, a, d in zip(completions, kwargs["answer"], kwargs["difficulty"])]


async def async_exact(response, answer):
    await asyncio.sleep(0)
    return float(response == answer)


@batched
def batch_exact(responses, answers):
    return [float(r == a) for r, a in zip(responses, answers)]


@batched
def batch_with_a_nan(responses, answers):
    return [math.nan if r == "nan" else float(r == a) for r, a in zip(responses, answers)]


def non_finite(response, answer):
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "none": None, "text": "1.0"}[response]


def needs_mystery(response, answer, mystery):
    return 1.0


def raises(response, answer):
    raise KeyError("no such column")


def hangs(response, answer):
    time.sleep(3600)


def suicide(response, answer):
    import os
    os._exit(3)


def trl_weighted_length(completions, difficulty, **kwargs):  # TRL's docs' shape, a column that differs per row
    return [d * len(c) / 10 for c, d in zip(completions, difficulty)]


def nan_on_odd_length(prompt, completion_ids):  # NaN for a known subset of samples: the count must reach the metrics
    return math.nan if (len(prompt) + len(completion_ids)) % 2 else 1.0


def sandbox_fails_on_odd_length(prompt, completion_ids):  # every real outcome agrees; the harness fails on some
    from rewards.sandbox import SandboxFailure

    if (len(prompt) + len(completion_ids)) % 2:
        raise SandboxFailure("the harness failed, not the program")
    return 1.0


def verl_length_parity(data_source, solution_str, ground_truth, extra_info=None):  # verl's signature
    """Raises (a counted reward error) unless verl's row fields reach it as verl passes them; scores the
    response length's parity, so a random model's samples of one prompt differ."""
    if data_source != "openai/gsm8k" or extra_info.get("split") != "train" or not ground_truth:
        raise ValueError(f"got data_source {data_source!r}, ground_truth {ground_truth!r}, extra_info {extra_info!r}")
    return float(len(solution_str) % 2)
