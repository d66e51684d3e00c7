"""The reference every engine is checked against: a teacher-forced fp32 forward of prompt + response."""
import torch

from rollout.model import fp32_logits


def teacher_forced(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log π(token) of each response token [len(tokens)], from one unbatched forward through the fp32 head."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = fp32_logits(model, model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1])
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
