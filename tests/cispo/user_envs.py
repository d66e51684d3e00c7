"""Environments as users write them, for tests/cispo/test_multiturn.py: named in a recipe as
`env.name: tests.cispo.user_envs:Class` and imported from the working directory."""
import gymnasium

from cispo.env import Environment, Step


class GuessGym(gymnasium.Env):
    """A Gymnasium text environment, written as Gymnasium's documentation shows: the task's answer comes
    in through reset's options; a right guess scores 1 and ends the episode, a wrong one gets "Try again."
    and 0.1 if it holds a digit at all (shaping, so a random model's rewards spread)."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.answer = str(options["answer"])
        return f"Guess {options['prompt']}", {}

    def step(self, action):
        right = self.answer in action
        return "Try again.", 1.0 if right else 0.1 * any(c.isdigit() for c in action), right, False, {}


class Calculator(Environment):
    """Ours: the first turn asks the question; a turn with the answer scores 1 and ends the episode,
    any other turn gets a hint to use the python tool."""

    def reset(self, task):
        self.answer = task.answer
        return [{"role": "user", "content": f"{task.prompt} Use the python tool."}]

    def step(self, text):
        if self.answer in text:
            return Step(None, 1.0, True)
        return Step("Call the python tool.", 0.0, False)


class RaisesInReset(Environment):
    def reset(self, task):
        raise RuntimeError("the task server is down")


class RaisesInStep(Calculator):
    def step(self, text):
        raise KeyError("lost the episode")


class StepReturnsADict(Calculator):
    def step(self, text):
        return {"reward": 1.0}


class NotAnEnvironment:
    reset = None
