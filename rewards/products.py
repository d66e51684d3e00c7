"""Products of two 4-digit numbers, a task the tiny model cannot compute but can hand to a tool.

The prompt is `1234*5678`; the answer is the product. A multi-turn episode (cispo.multiturn) may call
the python tool, `<tool_call>{"name":"python","arguments":{"code":"print(1234*5678)"}}</tool_call>` (compact
JSON; the character tokenizer has `<tool_call>` and `</tool_call>` as single tokens, as Qwen's does),
read its output and answer. `Products` is the environment, written Gymnasium-style (cispo.env adapts
it): the model's answering turn scores 1 when its first number is the product, and ends the episode.

The data ships no right use of the tool: each row's `target` (what the warm start imitates) is an
imperfect demonstrator's episode. Half the time it answers at once with a guess (its first factor);
otherwise it calls the tool with the two numbers joined by a random operator (+, - or *), then answers
with what the tool printed. It is right on about a sixth of rows; only the reward can teach it to call
the tool every time, with `*`. Each row's `direct` column is the right product answered without a tool:
the control's demonstrations (`data.columns={target: direct}` with `env.tools=[]`), which show how far the
model gets without tools when it is shown every answer.

    python -m rewards.products data/tiny-tool   # writes train.jsonl and eval.jsonl
"""
from __future__ import annotations

import json
import operator
import random
import re
import sys
from pathlib import Path

# ChatML's markers, as cispo's fresh character tokenizer has them with model.chat_template (rollout.model).
END, START = "<|im_end|>", "<|im_start|>"


def tool_call(code: str) -> str:
    return f'<tool_call>{json.dumps({"name": "python", "arguments": {"code": code}}, separators=(",", ":"))}</tool_call>'


def demonstration(a: int, b: int, rng: random.Random) -> str:
    """The demonstrator's episode after the prompt, as the chat template renders it: the model's turns
    and, between them, the tool's real output (the warm start imitates all of it)."""
    if rng.random() < 0.5:
        return f"{a}{END}"
    op = rng.choice("+-*")
    out = str({"+": operator.add, "-": operator.sub, "*": operator.mul}[op](a, b))
    return f"{tool_call(f'print({a}{op}{b})')}{END}\n{START}tool\n{out}\n{END}\n{START}assistant\n{out}{END}"


def correct(text: str, answer: str) -> bool:
    """Whether the first integer in `text` is `answer`."""
    found = re.search(r"-?\d+", text)
    return found is not None and found.group() == answer


class Products:
    """The environment, Gymnasium-style: `reset` shows the problem, `step` scores the answering turn and
    ends the episode (terminated)."""

    def reset(self, *, seed=None, options=None):
        self.answer = str(options["answer"])
        return options["prompt"], {}

    def step(self, action: str):
        return None, float(correct(action, self.answer)), True, False, {}


def write(out_dir: str | Path, train: int = 8_000, held_out: int = 200, seed: int = 0) -> dict[str, float]:
    """JSONL rows with `prompt`, `answer`, `target` (the demonstrator's episode) and `direct` (the product
    answered at once): `held_out` problems in eval.jsonl, `train` others in train.jsonl. Returns the
    demonstrator's accuracy on each file."""
    rng, out = random.Random(seed), Path(out_dir)
    pairs = list({(rng.randrange(1000, 10_000), rng.randrange(1000, 10_000)) for _ in range(2 * (train + held_out))})
    rng.shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    accuracy = {}
    for name, split in (("eval.jsonl", pairs[:held_out]), ("train.jsonl", pairs[held_out:held_out + train])):
        rows = [{"prompt": f"{a}*{b}", "answer": str(a * b), "target": demonstration(a, b, rng),
                 "direct": f"{a * b}{END}"} for a, b in split]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        accuracy[name] = sum(correct(r["target"].split(f"{START}assistant\n")[-1], r["answer"]) for r in rows) / len(rows)
    return accuracy


if __name__ == "__main__":
    for name, acc in write(sys.argv[1]).items():
        print(f"{name}: the demonstrator is right on {acc:.3f} of rows")
