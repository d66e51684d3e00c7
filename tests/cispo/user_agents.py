"""Agent functions as users write them against an OpenAI-compatible server, for tests/cispo/test_agent.py:
named in a recipe as `env.agent: tests.cispo.user_agents:function`. They use the `openai` client and know
nothing of cispo."""
import openai


def guess(base_url, task):
    """Two tries to guess the answer; a right guess scores 1, a wrong one 0.1 if it holds a digit at all (so a
    random model's rewards spread)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = [{"role": "user", "content": f"Guess {task.prompt}"}]
    reward = 0.0
    for _ in range(2):
        reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
        text = reply.choices[0].message.content
        if task.answer in text:
            return 1.0
        reward = max(reward, 0.1 * any(c.isdigit() for c in text))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Try again."}]
    return reward


REFUSALS = []  # what the server answered the edited call, as the agent's client saw it


def edits_history(base_url, task):
    """Strips the model's reply before sending it back (the record would no longer be the sampled tokens),
    is refused, then goes on with the reply unchanged."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": f"Guess {task.prompt}"}]
    text = client.chat.completions.create(model="policy", messages=messages, max_tokens=6).choices[0].message.content
    try:
        client.chat.completions.create(model="policy", max_tokens=6, messages=messages + [
            {"role": "assistant", "content": text + " (edited)"}, {"role": "user", "content": "Try again."}])
    except openai.BadRequestError as exc:
        REFUSALS.append(exc.message.removeprefix("Error code: 400 - "))
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Try again."}]
    client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    return 0.5


def raises(base_url, task):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": task.prompt}], max_tokens=4)
    raise RuntimeError("the agent's tool server is down")


def returns_text(base_url, task):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": task.prompt}], max_tokens=4)
    return "correct"


def never_calls(base_url, task):
    return 1.0


def asks_badly(base_url, task):
    """Asks for what the server does not serve, one request at a time, then makes one call it does."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": task.prompt}]
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    for extra in ({"stream": True}, {"n": 2}, {"tools": [tool]}, {"max_tokens": 0},
                  {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        try:
            client.chat.completions.create(**{"model": "policy", "messages": messages, **extra})
        except openai.BadRequestError as exc:
            REFUSALS.append(exc.message.removeprefix("Error code: 400 - "))
    client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
    return 0.0
