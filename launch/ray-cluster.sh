#!/usr/bin/env bash
# Submit a recipe to a running Ray cluster with `ray job submit`; this checkout is the job's working dir.
#
#   RAY_ADDRESS=http://HEAD:8265 launch/ray-cluster.sh recipes/m1-40k.yaml [key=value ...]
#
# The nodes must carry the custom resources the recipe places its roles on (resources.rollout.node_resource,
# resources.trainer.node_resource), and have the project's dependencies installed (one image for all):
#   ray start --head --resources '{"trainer": 1000}'
#   ray start --address HEAD:6379 --resources '{"rollout": 1000}'
# EXTRA_ENV='{"HF_HOME": "/shared/hf"}' adds variables to the runtime env.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://head-node:8265}"
[ $# -ge 1 ] || { echo "usage: $0 RECIPE [key=value ...]" >&2; exit 2; }
BIN=${CISPO_BIN:-.venv/bin}

# Resolve the recipe here first: a bad key fails in one line before anything is uploaded, and the
# plan shows whether the roles fit the cluster.
"$BIN/cispo" plan "$@"

# Uploaded: the source tree (Ray's limit is 500 MiB), not the venv, runs or git history.
runtime_env=$("$BIN/python" -c '
import json, os
env = {"WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **json.loads(os.environ.get("EXTRA_ENV") or "{}")}
print(json.dumps({"working_dir": ".", "excludes": [".venv/", "runs/", ".git/", "wandb/"], "env_vars": env}))')
exec "$BIN/ray" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env" \
    -- python -m cispo.cli train "$@"
