"""The tiny tool task (rewards.products): its environment's scoring, and a demonstration that is exactly
the tokens an episode holds (prompt, sampled turns, the tool's real output between them), so the warm
start imitates what episodes are made of."""
import json
import math
import random

import pytest

from cispo.config import load_recipe
from cispo.env import Step, Task, load_env
from cispo.loop import train
from cispo.metrics import read_metrics
from cispo.multiturn import ENDS, ChatTemplate
from rewards import products, sandbox
from rollout.model import starting_model
from tests.conftest import REPO

RECIPE = REPO / "recipes/tiny-tool.yaml"
# The recipe's warm start on its data at its rate, in more, smaller batches (1200 steps of 8 demonstrations, not
# 1500 of 32: a step's time grows with its batch, and copying the digits comes with the number of updates), then
# 2 RL steps of the recipe's 16 prompts. One after another on the shared 2-core machine (load average 7-10):
# 1500x32 took 299 s, 600x32 105 s (RL's first step: 3 right of 64 episodes), 800x16 81 s (5 right of 128);
# 1200x8 103 s at a load average of 20-30 (12 right of 128).
SHORT = ["sft.steps=1200", "sft.batch_size=8", "run.max_steps=2", "data.eval_size=8", "wandb.mode=disabled"]


@pytest.mark.parametrize("text, right", [("40906863", True), (" 40906863<|im_end|>", True), ("40906863 or 1", True),
                                         ("4090686", False), ("409068630", False), ("1 40906863", False), ("", False)])
def test_the_answering_turn_scores_one_only_for_the_product_first(text, right):
    env = load_env("rewards.products:Products")(seed=0)  # Gymnasium-style, adapted by cispo.env.GymText
    assert env.reset(Task("5751*7113", "40906863")) == [{"role": "user", "content": "5751*7113"}]
    assert env.step(text) == Step(None, float(right), True)


def test_a_demonstration_is_the_episode_the_chat_template_and_the_sandbox_make():
    # The recipe's fresh model: its character tokenizer gets ChatML's turn markers and the tool-call tags.
    _, tok = starting_model(load_recipe(RECIPE).model)
    template = ChatTemplate(tok, tool_role=True)
    rng, seen = random.Random(3), set()
    while len(seen) < 2:
        a, b = rng.randrange(1000, 10_000), rng.randrange(1000, 10_000)
        target = products.demonstration(a, b, rng)
        history = [{"role": "user", "content": f"{a}*{b}"}]
        if "<tool_call>" in target:
            call = json.loads(target.split("<tool_call>")[1].split("</tool_call>")[0])
            out = sandbox.run(call["arguments"]["code"], timeout_s=2, memory_mb=256, min_isolation="rlimits").stdout
            history += [{"role": "assistant", "content": target.split("<|im_end|>")[0]},
                        {"role": "tool", "content": out}, {"role": "assistant", "content": out.strip()}]
        else:
            history.append({"role": "assistant", "content": target.removesuffix("<|im_end|>")})
        seen.add(len(history))
        whole = template.render(history, False)
        demo = template.start(history[:1]) + tok(target, add_special_tokens=False)["input_ids"]
        assert demo == whole[:len(demo)] and tok.decode(whole[len(demo):]) == "\n"


@pytest.mark.slow  # the warm start's 1200 steps: 115 s in all on the loaded 2-core machine
def test_the_tiny_tool_recipe_calls_the_tool_and_its_rewards_spread(ray_session, tmp_path):
    """recipes/tiny-tool.yaml, its warm start in smaller batches, and 2 RL steps: what RL learns from is there.
    The warm start's episodes call the python tool with JSON that parses and code that runs, some answer right, and
    groups differ in reward, so steps train; the tool's output and the template's tokens do not train
    (their IS weight would sit far from 1). That RL then lifts held-out accuracy is the recipe's claim,
    measured by the full run in README's Results."""
    run_dir = tmp_path / "run"
    train(load_recipe(RECIPE, SHORT + [f"run.dir={run_dir}"]))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        episodes = sum(r[f"episode_end_{e}"] for e in ENDS)
        ran, broken = r["episode_tool_ok"], r["episode_tool_malformed"] + r["episode_tool_error"]
        # The full run's step 1: 64 of 128 episodes called the tool, every call parsed and ran; reward mean 0.125.
        # This warm start's: 82 of 128 called it, 4 calls malformed; reward mean 0.094.
        assert ran >= episodes / 4 and broken <= ran / 4, r
        assert r["trained_groups"] > 0 and 0 < r["reward_mean"] < 1, r
        assert abs(r["is_weight_mean"] - 1) < 0.01 and math.isfinite(r["loss"]) and r["grad_norm"] > 0, r
