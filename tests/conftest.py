import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole session: starting Ray costs ~4 s and each actor 3-6 s."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rollout.model import build_char_tokenizer

    return build_char_tokenizer("0123456789+=\\boxed{}")


def save_tiny_model(tok, path: Path) -> Path:
    """A random tiny hybrid model (seed 0) for tokenizer `tok`, saved with it as an HF directory at `path`."""
    import torch

    from rollout.model import build_hybrid, save_model

    torch.manual_seed(0)
    model = build_hybrid("tiny", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random tiny hybrid model saved as an HF directory with its tokenizer."""
    return save_tiny_model(tiny_tokenizer, tmp_path_factory.mktemp("tiny-model"))
