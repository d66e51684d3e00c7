"""Config sections owned by `rollout`: which model, and how to sample from it."""
from __future__ import annotations

import string

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    preset: str = Field("tiny", description="build_hybrid preset (tiny | small | m1) for a fresh random model")
    path: str | None = Field(None, description="an HF causal-LM directory to start from instead of a preset")
    overrides: dict = Field(default_factory=dict, description="MiniMaxConfig fields applied over the preset")
    seed: int = Field(0, description="seed for a fresh model's initial weights")
    alphabet: str = Field(string.digits + string.ascii_letters + string.punctuation + " \n",
                          description="characters of the offline character-level tokenizer (fresh models only)")


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="RolloutWorker Ray actors")
    n_samples: int = Field(8, ge=1, description="G: responses per prompt")
    max_new_tokens: int = Field(40_000, ge=1, description="thinking budget per response (M1: 40k or 80k)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    stop_strings: list[str] = Field(default_factory=list, description="end a response when its text contains one "
                                    "(EOS always ends it)")
    repetition_tokens: int = Field(3000, ge=1, description="M1: stop after this many consecutive confident tokens")
    repetition_prob: float = Field(0.99, gt=0, le=1, description="what 'confident' means for the repetition stop")
    max_batch_rows: int = Field(256, ge=1, description="sequences one worker decodes together; queued requests "
                                "join as rows finish")
    threads: int = Field(0, ge=0, description="torch threads per worker; 0 uses every core (phases run one at a time)")
