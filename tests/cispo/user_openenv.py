"""An OpenEnv environment as a user writes it, following openenv-core's documentation (its README's
`MyEnvironment`, reasoning_gym_env's models): pydantic Action/Observation/State subclasses, `reset` and
`step` returning observations that carry reward and done. Named in a recipe as
`env.name: tests.cispo.user_openenv:GuessEnvironment`; nothing in it knows cispo."""
from typing import Any, Optional
from uuid import uuid4

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field


class GuessAction(Action):
    guess: str = Field(..., description="the agent's guess")


class GuessObservation(Observation):
    prompt: Optional[str] = Field(default=None, description="what the agent reads next (None once done)")
    correct_answer: Optional[str] = Field(default=None, description="revealed when the episode ends")


class GuessEnvironment(Environment):
    """The task's answer comes in through reset's keyword arguments; a right guess scores 1 and ends the
    episode, a wrong one is told to try again and scores 0.1 if it holds a digit at all (so a random model's
    rewards spread)."""

    def __init__(self):
        super().__init__()
        self._state = State(episode_id=str(uuid4()), step_count=0)

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> GuessObservation:
        self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
        self.answer = str(kwargs["answer"])
        return GuessObservation(prompt=f"Guess {kwargs['prompt']}", done=False, reward=0.0)

    def step(self, action: GuessAction, timeout_s: Optional[float] = None, **kwargs: Any) -> GuessObservation:
        self._state.step_count += 1
        if self.answer in action.guess:
            return GuessObservation(correct_answer=self.answer, done=True, reward=1.0)
        return GuessObservation(prompt="Try again.", done=False, reward=0.1 * any(c.isdigit() for c in action.guess))

    @property
    def state(self) -> State:
        return self._state


class RaisesInReset(GuessEnvironment):
    def reset(self, seed=None, episode_id=None, **kwargs) -> GuessObservation:
        raise ConnectionError("the task store is unreachable")


class RaisesInStep(GuessEnvironment):
    def step(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
        raise ValueError("the board is corrupt")


class StepReturnsText(GuessEnvironment):
    def step(self, action: GuessAction, timeout_s=None, **kwargs):
        return "Try again."


class TwoFieldAction(Action):
    row: int
    col: int


class GridEnvironment(GuessEnvironment):
    def step(self, action: TwoFieldAction, timeout_s=None, **kwargs) -> GuessObservation:
        return GuessObservation(prompt="ok")
