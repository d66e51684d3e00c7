import subprocess
import sys

from cispo import plan
from cispo.cli import main
from cispo.config import load_recipe
from tests.conftest import REPO

M1_40K = REPO / "recipes" / "m1-40k.yaml"


def test_parameter_count_matches_the_built_model(tmp_path):
    import torch

    from rollout.model import build_char_tokenizer, build_hybrid

    recipe = load_recipe(REPO / "recipes" / "tiny-arith.yaml")
    shape, where = plan.model_shape(recipe)
    tok = build_char_tokenizer(recipe.model.alphabet)
    torch.manual_seed(0)
    model = build_hybrid("tiny", len(tok))
    assert where == "preset 'tiny'" and shape.vocab == len(tok)
    assert shape.params()[0] == sum(p.numel() for p in model.parameters())
    # A config.json at model.path wins over the preset.
    model.config.save_pretrained(tmp_path)
    shape_json, where_json = plan.model_shape(load_recipe(REPO / "recipes" / "tiny-arith.yaml", [f"model.path={tmp_path}"]))
    assert shape_json == shape and where_json.endswith("config.json")


def test_m1_shape_matches_the_report_and_the_hybrid_saves_flops_with_length():
    shape, _ = plan.model_shape(load_recipe(M1_40K))
    total, active = shape.params()
    assert abs(total / 1e9 - 456) < 1 and abs(active / 1e9 - 45.9) < 0.1  # M1: 456B total, 45.9B active
    ratios = [shape.flops_per_token(c) / shape.flops_per_token(c, hybrid=False) for c in plan.CONTEXTS]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.4
    # The report's ~25% of DeepSeek-R1 at 100K: the same count on R1's published shape lands near it.
    assert 0.18 < shape.flops_per_token(100_000) / plan.r1_flops_per_token(100_000) < 0.3


def test_m1_40k_memory_fits_and_smaller_cards_or_fewer_ranks_warn():
    p = plan.build(load_recipe(M1_40K))
    kv_per_token = 10 * 2 * 8 * 128 * 2  # 10 softmax layers, k and v, 8 KV heads of 128, bf16
    assert next(v for k, v in p.memory["rollout"].items() if k.startswith("KV")) == 64 * kv_per_token * 40_000 / 8
    assert not [w for w in p.warnings if "data source" not in w]  # the data files live on the cluster
    small = plan.build(load_recipe(M1_40K, ["resources.gpu_memory_gb=80"]))
    assert any(w.startswith("rollout: needs 12") and "more than resources.gpu_memory_gb=80" in w for w in small.warnings)
    few = plan.build(load_recipe(M1_40K, ["trainer.num_ranks=16", "trainer.zero_stage=1"]))
    assert any(w.startswith("trainer: needs") for w in few.warnings)
    crowded = plan.build(load_recipe(M1_40K, ["resources.nodes=8", "resources.rollout.gpus=16"]))
    assert any("cannot span nodes" in w for w in crowded.warnings)
    assert any("the roles need 768 GPUs; the cluster has 8 x 8" in w for w in crowded.warnings)


def test_a_colocated_plan_puts_each_replica_on_its_trainer_ranks_gpu():
    # Half of m1-40k's 64 nodes: enough for its 256 ranks, not for 32 rollout workers of 8 GPUs beside them.
    apart = plan.build(load_recipe(M1_40K, ["resources.nodes=32"]))
    together = plan.build(load_recipe(M1_40K, ["resources.nodes=32", "resources.colocate=true", "resources.rollout={}"]))
    assert together.roles[0] == ("rollout", 32, "inside a trainer rank (resources.colocate)")
    # A replica's whole model on its rank's one GPU, not split over 8, beside the rank's own share.
    rollout_on_one_gpu = {f"rollout {k}": v * 8 for k, v in apart.memory["rollout"].items()}
    assert together.memory["trainer"] == {**apart.memory["trainer"], **rollout_on_one_gpu}
    assert any(w.startswith("trainer: needs") for w in together.warnings)
    assert any("the roles need 512 GPUs; the cluster has 32 x 8" in w for w in apart.warnings)
    assert not any("the roles need" in w for w in together.warnings)


def test_cli_plan_prints_every_section(capsys):
    assert main(["plan", str(M1_40K), "rollout.num_workers=8"]) == 0
    out = capsys.readouterr().out
    for text in ("456.09B total, 45.94B active", "rollout     8 x 8 GPU", "rollout memory per GPU",
                 "trainer memory per GPU", "optimizer (fp32 master, m, v)", "linear-attention state",
                 "100K   hybrid", "~25% of DeepSeek-R1", "warning: rollout: needs"):
        assert text in out, text


def test_plan_imports_no_torch():
    # `cispo plan` is a quick check before a launch; torch, transformers, Ray and DeepSpeed take seconds to import.
    # A subprocess, so the modules other tests imported don't count; m1-40k takes the preset path.
    code = ("import sys; from cispo.cli import main; assert main(['plan', 'recipes/m1-40k.yaml']) == 0; "
            "heavy = {'torch', 'transformers', 'ray', 'deepspeed'} & set(sys.modules); assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_plan_refuses_other_families_by_name(capsys):
    assert main(["plan", str(REPO / "recipes" / "tiny-arith.yaml"), "model.preset=tiny-qwen3_5"]) != 0
    assert "preset 'tiny-qwen3_5' is a qwen3_5_text model" in capsys.readouterr().err
