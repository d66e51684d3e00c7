"""A rollout function as a user writes one, for tests/cispo/test_rollout_function.py: named in a recipe
as `rollout.function: tests.cispo.user_rollouts:with_tool_output` and imported from the working directory."""
from rollout.trajectory import Request, single_turn

# What the "tool" answers, as token ids of tiny-arith's character tokenizer ("+=+"): spliced into every
# response, never sampled by the policy, so it must never train.
TOOL_OUTPUT = [4, 15, 4]


def with_tool_output(inputs, engine):
    """Two engine calls per sample: a first turn, the tool's output (loss mask 0), then a second turn
    that continues from everything so far, on a seed of its own."""
    groups = single_turn(inputs, engine)
    second = []
    for x, group in zip(inputs, groups):
        for s, t in enumerate(group):
            t.insert(TOOL_OUTPUT)
            second.append(Request(t.prompt_ids + t.response_ids, seed=x.seed + 1000 * (s + 1), params=x.params))
    for t, more in zip([t for group in groups for t in group], engine.generate(second)):
        t.extend(more)
    return groups


def drops_a_sample(inputs, engine):
    """A broken rollout function: one trajectory short for the first prompt."""
    groups = single_turn(inputs, engine)
    return [groups[0][1:]] + groups[1:]
