"""Multi-turn episodes with exact tokens: `rollout.function: cispo.multiturn:Episodes` plays each sample as
an episode against the recipe's environment (`env.name`, cispo.env), optionally with tools (`env.tools`).

Turn k+1's input is turn k's prompt and response token ids, then the tokens of what came back (the
closing of the model's turn and the next message, as the chat template renders them), appended with
`Trajectory.insert`: loss mask 0, no logprob. Text is never re-tokenized into the trajectory, so the
trainer scores exactly the tokens the engine sampled. This holds only for a chat template with the
prefix property (rendering a conversation gives its turns' tokens concatenated); `ChatTemplate` checks
it and refuses a template that breaks it, by the tokenizer's name.

A turn that calls a tool (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the Hermes/Qwen
format) gets the tools' outputs as `tool` messages; any other turn goes to the environment's `step`.
Each episode is an engine session (`Request.session`): the engine keeps its state between turns, so a
turn prefills only the tokens inserted since the last one; `episode_state_kept` and
`episode_state_reprefill` count the later turns that did and did not find it kept.
Budgets (M1 §4's agentic RL): rollout.max_new_tokens across the episode, env.max_turn_tokens per turn,
env.max_turns, env.tool_timeout_s per tool call (CPU time, in the code sandbox).
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from cispo.config import EnvConfig, Recipe, RecipeError
from cispo.data import derive_seed
from cispo.env import EnvError, Task, load_env, messages, step_result
from rewards import sandbox
from rollout.trajectory import Request, RolloutInput, Trajectory

log = logging.getLogger(__name__)

# Why an episode ended, each counted as episode_end_<reason> in the rollout metrics.
ENDS = ("done", "max_turns", "token_budget", "repetition", "env_error")
# What a tool call came to, each counted as episode_tool_<outcome>; truncated is counted besides.
TOOL_OUTCOMES = ("ok", "error", "timeout", "sandbox_error", "malformed", "unknown", "truncated")
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


class ChatTemplate:
    """A tokenizer's chat template as the token pieces an episode appends, checked for the prefix property.

    - `start(messages)`: the first prompt's ids, ending with the generation prompt;
    - `end`: the ids the template puts after an assistant message's content: `end[0]` ends a turn (the
      turn's stop token), `end[1:]` follow it (e.g. ChatML's newline after <|im_end|>);
    - `follow(history, new)`: the ids that come after `history` (ending with an assistant message)
      when the messages `new` and the next generation prompt are rendered.
    Raises ValueError, one line naming the tokenizer, for a template that breaks the prefix property.
    """

    def __init__(self, tok, tool_role: bool):
        self.tok = tok
        self.name = f"the chat template of tokenizer {tok.name_or_path!r}"
        user, reply = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}
        head, whole = self.start([user]), self.render([user, reply], False)
        content = tok.encode(reply["content"], add_special_tokens=False)
        if whole[:len(head) + len(content)] != head + content or len(whole) == len(head) + len(content):
            raise ValueError(f"{self.name} does not render an assistant turn as the generation prompt, the "
                             f"content's tokens, then an end-of-turn token: multi-turn episodes need that")
        self.end = whole[len(head) + len(content):]
        self._check_prefix(tool_role)

    def render(self, msgs: list[dict], generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=True,
                                           return_dict=True)
        return list(out["input_ids"])

    def start(self, msgs: list[dict]) -> list[int]:
        return self.render(msgs, True)

    def follow(self, history: list[dict], new: list[dict]) -> list[int]:
        before, after = self.render(history, False), self.render(history + new, True)
        if after[:len(before)] != before:
            raise ValueError(f"{self.name} breaks the prefix property: adding a {new[0]['role']} message "
                             f"re-renders the conversation before it")
        return after[len(before):]

    def closing(self, turn_ids: list[int]) -> list[int]:
        """The template's tokens that close a turn the model sampled as `turn_ids`: what follows its
        end-of-turn token, or the whole end when the turn was cut before it (a cap, a stop string)."""
        return self.end[1:] if turn_ids[-1:] == self.end[:1] else list(self.end)

    def _check_prefix(self, tool_role: bool) -> None:
        """Build a probe conversation piece by piece, as an episode does, and compare with rendering it
        whole. The probe holds what templates are known to rewrite: reasoning in <think> (Qwen3 drops it
        from turns before the last user message) and whitespace around content."""
        turns = [("<think>\nAdd them.\n</think>\nLet me check. ", {"role": "tool" if tool_role else "user",
                                                                     "content": "4"}),
                 (" It is 4.\n", {"role": "user", "content": "Sure?"})]
        history = [{"role": "user", "content": "What is 2+2?"}]
        ids = self.start(history)
        for text, reply in turns:
            sampled = self.tok.encode(text, add_special_tokens=False) + self.end[:1]
            history.append({"role": "assistant", "content": text})
            ids += sampled + self.closing(sampled) + self.follow(history, [reply])
            history.append(reply)
        whole = self.render(history, True)
        if ids != whole:
            at = next((i for i, (a, b) in enumerate(zip(ids, whole)) if a != b), min(len(ids), len(whole)))
            raise ValueError(f"{self.name} breaks the prefix property: rendering a conversation whole differs "
                             f"from its turns' tokens concatenated at token {at} "
                             f"({self.tok.decode(whole[max(0, at - 8):at + 8])!r}); multi-turn episodes need a "
                             f"template that only appends")


def chat_template(recipe: Recipe, tok, tool_role: bool) -> ChatTemplate:
    """The tokenizer's template, checked, for a rollout function that plays turns. RecipeError, one line naming
    the key, without model.chat_template or a template, or for one without the prefix property."""
    if not (recipe.model.chat_template and tok.chat_template):
        raise RecipeError(f"{recipe.where('model.chat_template')}: multi-turn episodes need "
                          f"model.chat_template=true and a tokenizer with a chat template: its markers tell "
                          f"the turns apart")
    try:
        return ChatTemplate(tok, tool_role)
    except ValueError as exc:
        raise RecipeError(f"{recipe.where('rollout.function')}: {exc}") from None


def tool_calls(text: str) -> list[tuple[str, dict]]:
    """The (name, arguments) of each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in a turn, in
    order. ValueError, one line, for a malformed one (unclosed, not JSON, no name or arguments)."""
    found = TOOL_CALL.findall(text)
    if len(found) != text.count("<tool_call>"):
        raise ValueError("a <tool_call> is not closed by </tool_call>")
    calls = []
    for body in found:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"a tool call is not JSON ({exc.msg} at character {exc.pos})") from None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)):
            raise ValueError('a tool call must be {"name": str, "arguments": {...}}')
        calls.append((call["name"], call["arguments"]))
    return calls


def python_tool(arguments: dict, cfg: EnvConfig, min_isolation: str) -> tuple[str, str]:
    """Run the call's `code` in the code sandbox (rewards.sandbox.run, at `min_isolation`, with the env's CPU
    time and memory limits): (what the model sees, outcome). A crash, a hang or a flood is an observation."""
    code = arguments.get("code")
    if not isinstance(code, str) or set(arguments) != {"code"}:
        return 'error: the python tool takes {"code": str}', "malformed"
    return _observed(sandbox.run(code, timeout_s=cfg.tool_timeout_s, memory_mb=cfg.tool_memory_mb,
                                 min_isolation=min_isolation), cfg)


# The sandbox runs Python programs; this one hands the command (its stdin) to /bin/sh, whose processes
# inherit every limit of the level (CPU time per process, memory, output, process count, no network). A
# shell killed by a signal kills this program with it, so that the sandbox reads SIGXCPU as a timeout.
_SHELL = """import os, signal, subprocess, sys
code = subprocess.run(["/bin/sh", "-c", sys.stdin.read()]).returncode
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def shell_tool(arguments: dict, cfg: EnvConfig, min_isolation: str) -> tuple[str, str]:
    """Run the call's `command` with /bin/sh in the code sandbox, at the same level and limits as the python
    tool: (what the model sees, outcome)."""
    command = arguments.get("command")
    if not isinstance(command, str) or set(arguments) != {"command"}:
        return 'error: the shell tool takes {"command": str}', "malformed"
    return _observed(sandbox.run(_SHELL, command, timeout_s=cfg.tool_timeout_s, memory_mb=cfg.tool_memory_mb,
                                 min_isolation=min_isolation), cfg)


def _observed(result: sandbox.SandboxResult, cfg: EnvConfig) -> tuple[str, str]:
    if result.status == "ok":
        return result.stdout, "ok"
    note = {"timeout": f"error: the tool ran past its {cfg.tool_timeout_s:g} s limit",
            "sandbox_error": "error: the sandbox failed to run the tool"}.get(result.status,
                                                                          f"error: exit code {result.exit_code}")
    return "\n".join(part.rstrip("\n") for part in (result.stdout, result.stderr, note) if part), result.status


TOOLS = {"python": python_tool, "shell": shell_tool}


def _counts() -> dict[str, int]:
    return {"turns": 0, "turn_cap": 0, "state_kept": 0, "state_reprefill": 0, **{f"end_{e}": 0 for e in ENDS}, **{f"tool_{o}": 0 for o in TOOL_OUTCOMES}}


@dataclass
class _Episode:
    """One sample's episode while it plays: its environment, conversation (text, for the template) and
    trajectory (tokens; None before the first turn)."""
    env: object
    seed: int
    history: list[dict]
    prompt_ids: list[int]
    trajectory: Trajectory | None = None
    reward: float = 0.0
    end: str | None = None
    outcomes: dict[str, int] = field(default_factory=_counts)

    def ids(self) -> list[int]:
        t = self.trajectory
        return self.prompt_ids if t is None else t.prompt_ids + t.response_ids

    def used(self) -> int:
        return 0 if self.trajectory is None else len(self.trajectory.response_ids)

    def finish(self, end: str) -> None:
        self.end = end
        self.outcomes[f"end_{end}"] += 1


class Episodes:
    """The rollout function (rollout.trajectory.RolloutFunction) of multi-turn episodes; the Collector
    builds it once as `Episodes(recipe, tokenizer)`. Raises RecipeError, one line naming the key, for an
    environment that cannot load, a missing chat template, one without the prefix property, or a
    sandbox weaker than reward.min_isolation when a tool runs code."""

    def __init__(self, recipe: Recipe, tok):
        self.cfg, self.tok, self.workers = recipe.env, tok, recipe.reward.num_workers
        self.min_isolation = recipe.reward.min_isolation
        if not self.cfg.name:
            raise RecipeError(f"{recipe.where('env.name')}: rollout.function {recipe.rollout.function!r} plays "
                              f"episodes against an environment: set key 'env.name' to 'module:Class'")
        try:
            self.make_env = load_env(self.cfg.name, recipe.search_dirs())
        except ValueError as exc:
            raise RecipeError(f"{recipe.where('env.name')}: key 'env.name' = {self.cfg.name!r}: "
                              f"{str(exc).removeprefix(f'env {self.cfg.name!r}: ')}") from None
        self.template = chat_template(recipe, tok, tool_role=bool(self.cfg.tools))
        try:
            if self.cfg.tools:
                sandbox.isolation(self.min_isolation)
        except sandbox.SandboxUnavailable as exc:
            raise RecipeError(f"{recipe.where('rollout.function')}: {exc}") from None

    def __call__(self, inputs: list[RolloutInput], engine) -> list[list[Trajectory]]:
        episodes = [[self._reset(x, s) for s in range(x.n)] for x in inputs]
        flat = [(x, e) for x, group in zip(inputs, episodes) for e in group]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="env") as pool:
            for turn in range(self.cfg.max_turns):
                live = [(x, e) for x, e in flat if e.end is None]
                if not live:
                    break
                turns = engine.generate([self._request(x, e, turn) for x, e in live])
                last = turn + 1 == self.cfg.max_turns
                list(pool.map(lambda xe, sampled: self._play(*xe, sampled, last), live, turns))
        return [[self._trajectory(e) for e in group] for group in episodes]

    def _reset(self, x: RolloutInput, sample: int) -> _Episode:
        seed = derive_seed(x.seed, 0, "episode", sample)
        episode = _Episode(None, seed, [], x.prompt_ids)
        try:
            episode.env = self.make_env(seed)
            episode.history = messages(episode.env.reset(Task(x.text, x.answer, x.source, x.fields)), self.cfg.name)
            episode.prompt_ids = self.template.start(episode.history)
        except Exception as exc:  # the environment's fault: a counted outcome, the run goes on
            self._env_failed(episode, "reset", exc)
        return episode

    def _request(self, x: RolloutInput, e: _Episode, turn: int) -> Request:
        cap = min(self.cfg.max_turn_tokens, x.params.max_new_tokens - e.used())
        params = replace(x.params, max_new_tokens=cap, stop_token_ids=tuple(self.template.end[:1]))
        return Request(e.ids(), n=1, seed=derive_seed(e.seed, turn, "turn"), params=params, session=e.seed)

    def _play(self, x: RolloutInput, e: _Episode, turn: Trajectory, last: bool) -> None:
        """Add the model's turn to the episode, then what answers it (tools or the environment), or end it."""
        if e.trajectory is None:
            e.trajectory = turn
        else:
            e.trajectory.extend(turn)
            # A later turn whose engine kept no state for it (evicted, another worker) re-prefilled the history.
            kept = turn.outcomes.get("state_kept")
            e.outcomes["state_kept"] += kept == 1
            e.outcomes["state_reprefill"] += kept == 0
        e.outcomes["turns"] += 1
        sampled = turn.response_ids
        text = self.tok.decode(sampled[:-1] if sampled[-1:] == self.template.end[:1] else sampled)
        e.history.append({"role": "assistant", "content": text})
        if turn.finish_reason == "repetition":
            return e.finish("repetition")
        if e.used() >= x.params.max_new_tokens:
            return e.finish("token_budget")
        e.outcomes["turn_cap"] += turn.finish_reason == "length"
        if self.cfg.tools and "<tool_call>" in text:
            if last:  # no turn is left to read the tools' output
                return e.finish("max_turns")
            replies = self._tools(e, text)
        else:
            try:
                step = step_result(e.env.step(text), self.cfg.name)
                if not step.done and step.observation is None:
                    raise EnvError("step returned no observation for an episode that is not done")
            except Exception as exc:
                return self._env_failed(e, "step", exc)
            e.reward += step.reward
            if step.done:
                return e.finish("done")
            replies = [{"role": "user", "content": step.observation}]
        if last:
            return e.finish("max_turns")
        inserted = self.template.closing(sampled) + self.template.follow(e.history, replies)
        if e.used() + len(inserted) >= x.params.max_new_tokens:  # no room left for another turn
            return e.finish("token_budget")
        e.trajectory.insert(inserted)
        e.history += replies

    def _tools(self, e: _Episode, text: str) -> list[dict]:
        """Each tool call's output as a `tool` message, cut to env.max_observation_chars; a malformed call or
        an unknown tool is one message saying so."""
        try:
            calls = tool_calls(text)
        except ValueError as exc:
            e.outcomes["tool_malformed"] += 1
            return [{"role": "tool", "content": f"error: {exc}"}]
        replies = []
        for name, arguments in calls:
            if name in self.cfg.tools:
                out, outcome = TOOLS[name](arguments, self.cfg, self.min_isolation)
            else:
                out, outcome = f"error: unknown tool {name!r}; tools: {', '.join(self.cfg.tools)}", "unknown"
            e.outcomes[f"tool_{outcome}"] += 1
            cap = self.cfg.max_observation_chars
            if len(out) > cap:
                e.outcomes["tool_truncated"] += 1
                out = out[:cap] + f"\n[output cut: {len(out) - cap} more characters]"
            replies.append({"role": "tool", "content": out})
        return replies

    def _env_failed(self, e: _Episode, method: str, exc: Exception) -> None:
        log.warning("env %r raised in %s, episode ended: %s: %s", self.cfg.name, method, type(exc).__name__, exc)
        e.finish("env_error")

    def _trajectory(self, e: _Episode) -> Trajectory:
        """The episode's trajectory, rewarded by its environment (status env_error: no turn, or the
        environment failed; it does not train)."""
        t = e.trajectory or Trajectory(list(e.prompt_ids), [], [], [], [], "stop")
        t.reward, t.status, t.outcomes = e.reward, "env_error" if e.end == "env_error" else "ok", e.outcomes
        return t
