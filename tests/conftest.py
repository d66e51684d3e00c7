import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One torch thread per test process, unless the caller says otherwise: `make test` runs a pytest worker per core
# beside Ray actors and subprocesses, and torch's default of a thread per core oversubscribes the cores, so its
# threads wait on each other at every small op (tiny models: the engine's batch-composition test on Llama took
# 140 s with 2 threads and 6.6 s with 1, side by side in one process at a load average of 15 on 2 cores).
# Actors set their own threads (run.threads); subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test that cannot run its check fails instead of skipping: a skip there (no root, no
    pids cgroup, no bubblewrap) means a check CI exists to run went unrun. Modules that need an optional
    extra `make setup` does not install (tests/rollout/test_kernels.py: the gpu extra) skip at collection
    and are not test runs, so they stay skipped."""
    report = (yield).get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"CI=true: a skip is a failure here ({reason})"


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test: --dist loadfile --no-loadscope-reorder) files go to the workers in collection
    order, and the slow tests are collected first, so the files that hold them start first: a worker that drew a
    ten-minute test last would run it alone after the other had finished. Then the tests that start Ray actors
    (ray_session: runs, trainers, rollout workers; seconds each), then the rest, whose many short tests even out
    the workers' ends (test_end_to_end's last in file order had one worker run 24 s alone). The rest go in reverse
    file order: tests/rollout's and tests/rewards' files load models or run sandboxes (5-21 s a file) and
    tests/cispo's are mostly sub-second unit tests, so the last files out are short (test_vllm_engine.py, last in
    file order, had one worker run 13 s alone). The sort is stable, so every worker collects the same order, as
    xdist requires."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        files = {path: n for n, path in enumerate(dict.fromkeys(item.path for item in items))}

        def place(item):
            quick, no_actors = item.get_closest_marker("slow") is None, "ray_session" not in item.fixturenames
            return quick, no_actors, -files[item.path] if quick and no_actors else files[item.path]
        items.sort(key=place)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole session: starting Ray costs ~4 s and each actor 3-6 s."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield ray
    ray.shutdown()


# The warm start the RL tests share: 60 SFT steps on one-digit sums (tiny-arith's model and data), no RL.
# A run given `model.path=<it>` and `sft.steps=0` starts from it; each test that used to warm-start its own
# model (10-60 steps) starts here instead, so the session pays for one warm start.
WARM_ARGS = ["data.digits=1", "data.eval_size=20", "sft.steps=60", "sft.stop_at_accuracy=null",
             "run.max_steps=0", "run.threads=1", "wandb.mode=disabled"]


@pytest.fixture(scope="session")
def warm_arith(ray_session, tmp_path_factory) -> Path:
    """The shared warm start's model directory (an HF directory with its tokenizer).

    Under pytest-xdist (`make test` runs two workers) the workers share the session's temp root: the first to
    ask builds the warm start there under a file lock, the other waits and reuses it, so a session pays once."""
    from filelock import FileLock

    from cispo.config import load_recipe
    from cispo.loop import train

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's basetemp is <session root>/popen-gwN
    run_dir = root / "warm-arith" / "run"
    with FileLock(root / "warm-arith.lock"):
        if not (run_dir / "summary.json").exists():  # a run writes it last, after its final model
            train(load_recipe(REPO / "recipes/tiny-arith.yaml", [*WARM_ARGS, f"run.dir={run_dir}"]))
    return run_dir / "final"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rollout.model import build_char_tokenizer

    return build_char_tokenizer("0123456789+=\\boxed{}")


# M1's layout shrunk to its two layer kinds, a lightning layer then a softmax layer, each with the `tiny` preset's
# 4 experts (recipes/tiny-tool.yaml's shape, 240k parameters): for checks that need both kinds of layer and
# state, not the 8-layer preset's size, at about a quarter of its time per token.
M1_TWO_LAYERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, layer_types=["linear_attention", "full_attention"], block_size=16)
TWO_LAYERS = f"model.overrides={json.dumps(M1_TWO_LAYERS)}"  # the same, as a recipe argument (JSON is YAML)


def save_tiny_model(tok, path: Path, **overrides) -> Path:
    """A random tiny hybrid model (seed 0; `overrides` change the `tiny` preset) for tokenizer `tok`, saved with
    it as an HF directory at `path`."""
    import torch

    from rollout.model import build_hybrid, save_model

    torch.manual_seed(0)
    model = build_hybrid("tiny", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **overrides)
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random tiny hybrid model saved as an HF directory with its tokenizer."""
    return save_tiny_model(tiny_tokenizer, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def two_layer_model_dir(tmp_path_factory, tiny_tokenizer):
    """tiny_model_dir's model shrunk to M1_TWO_LAYERS, saved the same way."""
    return save_tiny_model(tiny_tokenizer, tmp_path_factory.mktemp("two-layer-model"), **M1_TWO_LAYERS)
