"""`cispo train|eval|plan|filter RECIPE [key=value ...]`, `cispo report RUN_DIR [RUN_DIR ...]`,
`cispo export RUN_DIR OUT_DIR`."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from cispo.config import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cispo", description="CISPO reinforcement learning for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a recipe")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="dotted key=value, e.g. run.max_steps=10")
    evaluate = sub.add_parser("eval", help="greedy accuracy (or pass@k) of a run or HF model on the recipe's held-out split")
    evaluate.add_argument("recipe")
    evaluate.add_argument("overrides", nargs="*", help="model=RUN_DIR|HF_DIR (default: the recipe's run.dir), "
                          "then dotted key=value, e.g. eval.n_samples=8 eval.k=4")
    evaluate.add_argument("--out", help="result JSON (default: eval.json in the run dir, or here for an HF dir)")
    report = sub.add_parser("report", help="plot runs' metrics against step (seeds of one configuration as a band) "
                            "to report.png and print a table of them, also written to report.md")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="output dir (default: RUN_DIR for one run, the runs' common parent dir for several)")
    export = sub.add_parser("export", help="write a checkpoint as an HF save_pretrained directory")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    plan = sub.add_parser("plan", help="resources, memory per GPU and FLOPs per token for a recipe; warns if it cannot fit")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", help="dotted key=value")
    filt = sub.add_parser("filter", help="write the training prompts whose pass rate is in (low, high) (M1: pass@10 in (0, 0.9))")
    filt.add_argument("recipe")
    filt.add_argument("out", help="output JSONL")
    filt.add_argument("overrides", nargs="*", help="dotted key=value")
    filt.add_argument("--n", type=int, default=10, help="samples per prompt")
    filt.add_argument("--low", type=float, default=0.0)
    filt.add_argument("--high", type=float, default=0.9)
    comp = sub.add_parser("compare", help="run a comparison spec (recipes/compare/) and write its tables and figure")
    comp.add_argument("spec")
    comp.add_argument("--out", help="output dir (default: the spec's out)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            recipe = load_recipe(args.recipe, args.overrides)
            from cispo.loop import train as run_training

            result = run_training(recipe)
            if result.get("interrupted"):  # 128 + signal number, as a shell reports a signal
                return 128 + signal.Signals[result["interrupted"]].value
        elif args.command == "eval":
            from cispo.evaluate import evaluate as evaluate_model

            model = [o.partition("=")[2] for o in args.overrides if o.startswith("model=")]
            overrides = [o for o in args.overrides if not o.startswith("model=")]
            result = evaluate_model(load_recipe(args.recipe, overrides), model[-1] if model else None, args.out)
            print(f"{result['metric']} {result['value']:.4f} on {result['prompts']} held-out prompts of "
                  f"{args.recipe} ({', '.join(f'{k} {v:.4f}' for k, v in result['per_source'].items())}); "
                  f"model {result['model']}; wrote {result['out']}")
        elif args.command == "report":
            from cispo.report import report as write_report

            result = write_report(args.run_dirs, args.out)
            print(result.text, end="")
            print(f"wrote {result.figure} and {result.table}")
        elif args.command == "export":
            from cispo.export import export as export_checkpoint

            print(f"exported {export_checkpoint(args.run_dir, args.out_dir, args.step)} to {args.out_dir}")
        elif args.command == "plan":
            from cispo import plan as planner

            recipe = load_recipe(args.recipe, args.overrides)
            print(planner.render(planner.build(recipe), recipe))
        elif args.command == "filter":
            from cispo.filter import filter_by_pass_rate

            counts = filter_by_pass_rate(load_recipe(args.recipe, args.overrides), args.out, args.n, args.low, args.high)
            print(json.dumps(counts))
        elif args.command == "compare":
            from cispo.compare import compare

            try:
                ok, _ = compare(args.spec, args.out)
            except KeyboardInterrupt:
                print("cispo compare: interrupted; run the same command again to resume", file=sys.stderr)
                return 130
            return 0 if ok else 1
    except RecipeError as err:
        print(f"cispo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
