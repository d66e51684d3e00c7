"""`cispo train|eval|plan|filter RECIPE [key=value ...]`, `cispo report RUN_DIR [RUN_DIR ...]`,
`cispo export RUN_DIR OUT_DIR`, `cispo compare SPEC`.

Each command is a `COMMANDS` entry: its help, a function that adds its arguments, and the function that
runs it (imported when it runs, so `cispo plan` loads no torch) returning the exit code.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from cispo.config import RecipeError, load_recipe


def _recipe_args(p: argparse.ArgumentParser, hint: str = "dotted key=value, e.g. run.max_steps=10") -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help=hint)


def _train(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)  # before the ~4 s of imports: a bad recipe fails at once
    from cispo.loop import train

    result = train(recipe)
    # 128 + signal number, as a shell reports a signal
    return 128 + signal.Signals[result["interrupted"]].value if result.get("interrupted") else 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p, "model=RUN_DIR|HF_DIR (default: the recipe's run.dir), then dotted key=value, "
                    "e.g. eval.n_samples=8 eval.k=4")
    p.add_argument("--out", help="result JSON (default: eval.json in the run dir, or here for an HF dir)")


def _eval(args) -> int:
    model = [o.partition("=")[2] for o in args.overrides if o.startswith("model=")]
    recipe = load_recipe(args.recipe, [o for o in args.overrides if not o.startswith("model=")])
    from cispo.evaluate import evaluate

    result = evaluate(recipe, model[-1] if model else None, args.out)
    print(f"{result['metric']} {result['value']:.4f} on {result['prompts']} held-out prompts of "
          f"{args.recipe} ({', '.join(f'{k} {v:.4f}' for k, v in result['per_source'].items())}); "
          f"model {result['model']}; wrote {result['out']}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output dir (default: RUN_DIR for one run, the runs' common parent dir for several)")


def _report(args) -> int:
    from cispo.report import report

    result = report(args.run_dirs, args.out)
    print(result.text, end="")
    print(f"wrote {result.figure} and {result.table}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")


def _export(args) -> int:
    from cispo.export import export

    print(f"exported {export(args.run_dir, args.out_dir, args.step)} to {args.out_dir}")
    return 0


def _plan(args) -> int:
    from cispo import plan

    recipe = load_recipe(args.recipe, args.overrides)
    print(plan.render(plan.build(recipe), recipe))
    return 0


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("out", help="output JSONL")
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    p.add_argument("--n", type=int, default=10, help="samples per prompt")
    p.add_argument("--low", type=float, default=0.0)
    p.add_argument("--high", type=float, default=0.9)


def _filter(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from cispo.filter import filter_by_pass_rate

    print(json.dumps(filter_by_pass_rate(recipe, args.out, args.n, args.low, args.high)))
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec")
    p.add_argument("--out", help="output dir (default: the spec's out)")


def _compare(args) -> int:
    from cispo.compare import compare

    try:
        ok, _ = compare(args.spec, args.out)
    except KeyboardInterrupt:
        print("cispo compare: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0 if ok else 1


# name -> (help, add its arguments, run it)
COMMANDS = {
    "train": ("run a recipe", _recipe_args, _train),
    "eval": ("greedy accuracy (or pass@k) of a run or HF model on the recipe's held-out split", _eval_args, _eval),
    "report": ("plot runs' metrics against step (seeds of one configuration as a band) to report.png and print a "
               "table of them, also written to report.md", _report_args, _report),
    "export": ("write a checkpoint as an HF save_pretrained directory", _export_args, _export),
    "plan": ("resources, memory per GPU and FLOPs per token for a recipe; warns if it cannot fit", _recipe_args, _plan),
    "filter": ("write the training prompts whose pass rate is in (low, high) (M1: pass@10 in (0, 0.9))",
               _filter_args, _filter),
    "compare": ("run a comparison spec (recipes/compare/) and write its tables and figure", _compare_args, _compare),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cispo", description="CISPO reinforcement learning for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except RecipeError as err:
        print(f"cispo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
