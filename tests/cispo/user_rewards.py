"""A reward with spread on a random model's text, so that tests of the loop train on nonzero advantages."""


def plus_signs(response: str, answer: str) -> float:
    """The share of the response's characters that are '+'."""
    return response.count("+") / max(1, len(response))
