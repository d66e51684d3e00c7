"""Agent mode: `rollout.function: cispo.agent:Agents` runs the recipe's agent function (`env.agent:
module:function`) once per sample, as `fn(base_url, task) -> reward`. The agent runs its own loop with the
`openai` client against `base_url`, an OpenAI-compatible `/v1/chat/completions` that cispo serves on loopback
during rollout, backed by the rollout engine; `task` is the prompt's cispo.env.Task.

Each sample is a session with its own URL. Every call is recorded as exact token ids, logprobs and weight
versions, and the episode trains from that record, built as cispo.multiturn builds an episode: the first
call's messages rendered by the chat template are the prompt; each call's sampled tokens carry loss; the
template's closing of a turn and the messages the agent added since are inserted (loss mask 0). The agent
only ever sees text.

Turn k+1 reuses turn k's exact tokens, so a call must send the previous call's messages and the reply it
got, unchanged (role and content), then new messages. A call that does not (the agent edited, dropped or
re-ordered history) is refused with HTTP 400 naming the first message that differs, counted as
`episode_refused_prefix`; the session's record stays as it was, so a later call that extends it goes on.
The recipe's sampling parameters apply (the request's temperature, top_p and the like are ignored); a
request's `max_tokens` lowers env.max_turn_tokens. Also refused, each counted: streaming, n > 1, `tools=`
(`refused_request`), a call past env.max_turns (`refused_max_turns`) or past the episode's token budget,
rollout.max_new_tokens across calls (`refused_token_budget`).
An agent that raises, returns other than a number, or made no call ends its episode as `end_agent_error`
(status env_error: it does not train); the run goes on.

Concurrent calls from all sessions are batched into one engine call: the rollout function's thread sends
what is pending once every running agent waits on a call, or 50 ms after the first arrived.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cispo.config import Recipe, RecipeError
from cispo.data import derive_seed
from cispo.env import Task
from cispo.multiturn import chat_template
from rewards.plugins import import_function
from rollout.trajectory import Request, RolloutInput, Trajectory

log = logging.getLogger(__name__)

REFUSALS = ("request", "prefix", "max_turns", "token_budget")
BATCH_WAIT_S = 0.05  # how long a pending call waits for the other running agents before the engine runs


class Refused(Exception):
    """A call cispo does not serve: HTTP 400, counted as refused_<reason>."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Session:
    """One sample's episode while its agent runs: the conversation as the agent last saw it (its messages and
    our reply) and the record of tokens (None before the first call)."""
    x: RolloutInput
    seed: int
    history: list[dict] = field(default_factory=list)
    trajectory: Trajectory | None = None
    last_turn: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: dict[str, int] = field(default_factory=lambda: {
        "turns": 0, "state_kept": 0, "state_reprefill": 0, "end_done": 0, "end_agent_error": 0,
        **{f"refused_{r}": 0 for r in REFUSALS}})

    def used(self) -> int:
        return 0 if self.trajectory is None else len(self.trajectory.response_ids)


@dataclass
class _Call:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    turn: Trajectory | None = None


class Agents:
    """The rollout function (rollout.trajectory.RolloutFunction) of agent mode; the Collector builds it once as
    `Agents(recipe, tokenizer)`, which starts the loopback server. Raises RecipeError, one line naming the key,
    without env.agent, for an agent that cannot be imported, or a chat template that fails cispo.multiturn's
    checks."""

    def __init__(self, recipe: Recipe, tok):
        self.cfg, self.tok = recipe.env, tok
        self.name = recipe.env.agent
        if not self.name:
            raise RecipeError(f"{recipe.where('env.agent')}: rollout.function {recipe.rollout.function!r} runs an "
                              f"agent: set key 'env.agent' to 'module:function'")
        self.agent = recipe._load("env.agent", self.name, "agent",
                                  lambda name, search: import_function(name, search, kind="agent"))
        self.template = chat_template(recipe, tok, tool_role=True)
        self.sessions: dict[str, _Session] = {}
        self.pending: list[_Call] = []
        self.running, self.failed = 0, False
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="agent-server", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __call__(self, inputs: list[RolloutInput], engine) -> list[list[Trajectory]]:
        groups = [[_Session(x, derive_seed(x.seed, 0, "episode", s)) for s in range(x.n)] for x in inputs]
        flat = [s for group in groups for s in group]
        tokens = [uuid.uuid4().hex for _ in flat]
        with self.cond:
            self.sessions.update(zip(tokens, flat))
            self.running, self.failed = len(flat), False
        try:
            with ThreadPoolExecutor(max(1, len(flat)), thread_name_prefix="agent") as pool:
                for token, s in zip(tokens, flat):
                    pool.submit(self._run, token, s)
                self._serve(engine)
        finally:
            with self.cond:
                for token in tokens:
                    del self.sessions[token]
        return [[self._trajectory(s) for s in group] for group in groups]

    def _serve(self, engine) -> None:
        """Send pending calls to the engine, batched, until every agent has returned. The engine runs on this
        thread only."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.running == 0 or (self.pending and len(self.pending) >= self.running),
                                   timeout=BATCH_WAIT_S)
                if self.running == 0 and not self.pending:
                    return
                batch, self.pending = self.pending, []
            try:
                turns = engine.generate([c.request for c in batch]) if batch else []
            except BaseException:  # it ends the run: no call waits on the engine any more, none is admitted
                with self.cond:
                    self.failed, batch, self.pending = True, batch + self.pending, []
                for c in batch:
                    c.done.set()
                raise
            for c, turn in zip(batch, turns):
                c.turn = turn
                c.done.set()

    def _run(self, token: str, s: _Session) -> None:
        x = s.x
        try:
            reward = self.agent(f"{self.url}/s/{token}/v1", Task(x.text, x.answer, x.source, x.fields))
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise TypeError(f"returned {reward!r}; an agent returns its episode's reward, a finite number")
            if s.trajectory is None:
                raise RuntimeError("made no call to base_url; there is nothing to train")
            s.trajectory.reward = float(reward)
            s.outcomes["end_done"] += 1
        except Exception as exc:  # the agent's fault: a counted outcome, the run goes on
            log.warning("agent %r failed, episode ended: %s: %s", self.name, type(exc).__name__, exc)
            s.outcomes["end_agent_error"] += 1
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def complete(self, s: _Session, body: dict) -> dict:
        """One chat-completion call of session `s`: the reply as OpenAI's response body. Raises Refused."""
        with s.lock:  # one call at a time per session: each extends the one before
            try:
                return self._complete(s, body)
            except Refused as exc:
                s.outcomes[f"refused_{exc.reason}"] += 1
                raise

    def _complete(self, s: _Session, body: dict) -> dict:
        msgs = _messages(body)
        budget = s.x.params.max_new_tokens
        if s.outcomes["turns"] >= self.cfg.max_turns:
            raise Refused("max_turns", f"the episode has made its env.max_turns={self.cfg.max_turns} calls")
        if s.trajectory is None:
            ids, inserted = self.template.start(msgs), []
        else:
            n = len(s.history)
            if msgs[:n] != s.history or len(msgs) == n:
                at = next((i for i, (a, b) in enumerate(zip(msgs, s.history)) if a != b), min(len(msgs), n))
                raise Refused("prefix", f"messages[{at}] differs from what the previous call sent and got back: a "
                                        f"call resends the conversation unchanged, then adds messages")
            try:
                inserted = self.template.closing(s.last_turn) + self.template.follow(s.history, msgs[n:])
            except ValueError as exc:
                raise Refused("prefix", str(exc)) from None
            ids = s.trajectory.prompt_ids + s.trajectory.response_ids + inserted
        room = budget - s.used() - len(inserted)
        if room <= 0:
            raise Refused("token_budget", f"the episode's token budget (rollout.max_new_tokens={budget}) is spent")
        asked = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), room)
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise Refused("request", f"max_tokens={asked!r} is not a positive integer")
        cap = min(self.cfg.max_turn_tokens, room, asked)
        params = replace(s.x.params, max_new_tokens=cap, stop_token_ids=tuple(self.template.end[:1]))
        call = _Call(Request(ids, n=1, seed=derive_seed(s.seed, s.outcomes["turns"], "turn"), params=params,
                             session=s.seed))
        with self.cond:
            if self.failed:
                raise RuntimeError("the engine failed")
            self.pending.append(call)
            self.cond.notify_all()
        call.done.wait()
        if call.turn is None:
            raise RuntimeError("the engine failed")
        self._record(s, call.turn, inserted)
        text = self.tok.decode(s.last_turn[:-1] if s.last_turn[-1:] == self.template.end[:1] else s.last_turn)
        s.history = msgs + [{"role": "assistant", "content": text}]
        sampled = len(call.turn.response_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "policy"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if call.turn.finish_reason == "stop" else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": sampled,
                          "total_tokens": len(ids) + sampled}}

    def _record(self, s: _Session, turn: Trajectory, inserted: list[int]) -> None:
        if s.trajectory is None:
            s.trajectory = turn
        else:
            s.trajectory.insert(inserted)
            s.trajectory.extend(turn)
            kept = turn.outcomes.get("state_kept")  # the engine kept this session's state since the last call
            s.outcomes["state_kept"] += kept == 1
            s.outcomes["state_reprefill"] += kept == 0
        s.outcomes["turns"] += 1
        s.last_turn = list(turn.response_ids)

    def _trajectory(self, s: _Session) -> Trajectory:
        """The session's record, rewarded by its agent (status env_error when the agent failed: not trained)."""
        t = s.trajectory or Trajectory(list(s.x.prompt_ids), [], [], [], [], "stop")
        failed = s.outcomes["end_agent_error"] > 0
        t.reward, t.status, t.outcomes = (0.0 if failed else t.reward), ("env_error" if failed else "ok"), s.outcomes
        return t


def _messages(body: dict) -> list[dict]:
    """The request's messages as {'role', 'content'} text dicts. Refused for what the engine cannot serve."""
    for key, ok in (("stream", lambda v: not v), ("n", lambda v: v in (None, 1)), ("tools", lambda v: not v)):
        if not ok(body.get(key)):
            raise Refused("request", f"{key}={body[key]!r} is not served: one non-streamed completion per call, "
                                     f"tool calls written in the text")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Refused("request", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(p.get("text", "") for p in content)
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(content, str)):
            raise Refused("request", f"messages[{i}] must have a role and text content")
        out.append({"role": m["role"], "content": content})
    return out


def _handler(agents: Agents) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            parts = self.path.strip("/").split("/")  # s/<token>/v1/chat/completions
            if len(parts) != 5 or parts[0] != "s" or parts[2:] != ["v1", "chat", "completions"]:
                return self._send(404, _error(f"no such endpoint {self.path}; POST {{base_url}}/chat/completions"))
            session = agents.sessions.get(parts[1])
            if session is None:
                return self._send(404, _error(f"no running session {parts[1]}: a base_url serves its episode only"))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._send(200, agents.complete(session, body if isinstance(body, dict) else {}))
            except json.JSONDecodeError as exc:
                self._send(400, _error(f"the body is not JSON ({exc.msg})"))
            except Refused as exc:
                self._send(400, _error(str(exc)))
            except Exception as exc:  # ours, not the agent's: the agent's client sees a server error
                self._send(500, _error(f"{type(exc).__name__}: {exc}"))

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # one line per call on stderr would drown the run's log
            pass

    return Handler


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error"}}
