"""Multi-turn rollout: the session's state kept between turns against re-prefilling the history each turn.

8 episodes of 8 turns on a small hybrid model (hidden 256, 8 layers, M1's 7:1 layout). Each turn
samples 32 tokens (no EOS, so every turn runs to its cap), then 64 tokens of a tool's output are
appended, as cispo.multiturn appends them, before the next turn: at turn 8 an episode's history is
about 800 tokens. One engine keeps each episode's state between turns (`max_kept_sessions=8`), so a
turn prefills only its 64 + 1 new tokens; the other keeps none (`max_kept_sessions=0`) and prefills the
whole history every turn. Both are `CispoEngine`s with the same weights, run alternately in one
process; their tokens must agree.

    python benchmarks/multiturn_throughput.py [--repeats 3] [--threads 1]

Prints one JSON line: per turn, the median seconds of each and their ratio (re-prefill / kept); the
ratio should grow with the turn number, since the history re-prefilled grows and the new tokens do not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import build_hybrid
from rollout.trajectory import Request, SamplingParams

VOCAB, EPISODES, TURNS, PROMPT_LEN, TURN_TOKENS, OBSERVATION = 4096, 8, 8, 32, 32, 64


def play(engine, prompts, observations) -> tuple[list[float], list[list[int]]]:
    """Every episode's turns, one engine call per turn: seconds per turn, and the final histories."""
    params = SamplingParams(max_new_tokens=TURN_TOKENS, temperature=1.0)
    histories, seconds = [list(p) for p in prompts], []
    for turn in range(TURNS):
        requests = [Request(h, seed=1000 * turn + e, params=params, session=e) for e, h in enumerate(histories)]
        t0 = time.perf_counter()
        out = engine.generate(requests)
        seconds.append(time.perf_counter() - t0)
        histories = [t.prompt_ids + t.response_ids + observations[e][turn] for e, t in enumerate(out)]
    return seconds, histories


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_hybrid("small", VOCAB).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, VOCAB, (EPISODES, PROMPT_LEN), generator=g).tolist()
    observations = torch.randint(4, VOCAB, (EPISODES, TURNS, OBSERVATION), generator=g).tolist()
    engines = {}
    for name, kept in (("kept", EPISODES), ("reprefill", 0)):
        engines[name] = CispoEngine(build_hybrid("small", VOCAB).eval(), RolloutConfig(max_kept_sessions=kept), pad_id=0)
        engines[name].load_weights(model.state_dict(), 0)  # also clears what a previous repeat kept
    runs = {"kept": [], "reprefill": []}
    for _ in range(args.repeats):  # alternated, so that load from other processes hits both alike
        outs = {}
        for name, engine in engines.items():
            engine.load_weights(model.state_dict(), 0)
            seconds, outs[name] = play(engine, prompts, observations)
            runs[name].append(seconds)
        assert outs["kept"] == outs["reprefill"], "keeping the state changed the sampled tokens"
    median = {name: [statistics.median(r[t] for r in rs) for t in range(TURNS)] for name, rs in runs.items()}
    print(json.dumps({
        "benchmark": "multiturn_throughput", "model": "small (hidden 256, 8 layers, 7:1)", "episodes": EPISODES,
        "turns": TURNS, "tokens_per_turn": TURN_TOKENS, "observation_tokens": OBSERVATION,
        "final_history_tokens": len(outs["kept"][0]), "repeats": args.repeats, "threads": args.threads,
        "kept_s_per_turn": [round(s, 3) for s in median["kept"]],
        "reprefill_s_per_turn": [round(s, 3) for s in median["reprefill"]],
        "ratio_per_turn": [round(b / a, 2) for a, b in zip(median["kept"], median["reprefill"])],
        "ratio_8_turns": round(sum(median["reprefill"]) / sum(median["kept"]), 2)}))


if __name__ == "__main__":
    main()
