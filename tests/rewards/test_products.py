"""The tiny tool task (rewards.products): its environment's scoring, and a demonstration that is exactly
the tokens an episode holds (prompt, sampled turns, the tool's real output between them), so the warm
start imitates what episodes are made of."""
import json
import random

import pytest

from cispo.env import Step, Task, load_env
from cispo.multiturn import ChatTemplate
from rewards import products, sandbox
from rollout.config import ModelConfig
from rollout.model import starting_model


@pytest.mark.parametrize("text, right", [("40906863", True), (" 40906863<|im_end|>", True), ("40906863 or 1", True),
                                         ("4090686", False), ("409068630", False), ("1 40906863", False), ("", False)])
def test_the_answering_turn_scores_one_only_for_the_product_first(text, right):
    env = load_env("rewards.products:Products")(seed=0)  # Gymnasium-style, adapted by cispo.env.GymText
    assert env.reset(Task("5751*7113", "40906863")) == [{"role": "user", "content": "5751*7113"}]
    assert env.step(text) == Step(None, float(right), True)


def test_a_demonstration_is_the_episode_the_chat_template_and_the_sandbox_make():
    # The model section the tiny tool task needs (its recipe is not landed): a fresh preset whose character
    # tokenizer gets ChatML's turn markers.
    _, tok = starting_model(ModelConfig(preset="tiny", chat_template=True, seed=0))
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
