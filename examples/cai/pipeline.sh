#!/usr/bin/env bash
# bash examples/cai/pipeline.sh
#
# Constitutional AI in three commands on SmolLM2-135M-Instruct, each step's output feeding the next:
#   1. tunesmith cai: draft, critique against a sampled principle, revise -> runs/cai/{sft,preference}.jsonl
#   2. supervised tuning on the revisions (examples/cai/sft.yaml), merged into a plain model folder
#   3. DPO on the (revision > draft) pairs from that model (needs the dpo stage, `stage: dpo`)
# Every command refuses to replace a folder it did not just create; pass --overwrite to redo one.
set -euo pipefail
cd "$(dirname "$0")/../.."

tunesmith cai --principles examples/cai/principles.jsonl --prompts examples/cai/prompts.jsonl \
    --out runs/cai --model smollm2-135m-instruct --max-new-tokens 160 "$@"
tunesmith train examples/cai/sft.yaml
tunesmith export --adapter runs/cai-sft/adapter --out runs/cai-sft-merged --merge

cat > runs/cai-dpo.yaml <<'YAML'
model: {name: runs/cai-sft-merged}
data: {train: runs/cai/preference.jsonl, validation_fraction: 0.2, max_length: 512}
stage: dpo
method: {kind: lora, r: 16, alpha: 32, targets: all-linear}
train: {epochs: 2, batch_size: 4, lr: 5.0e-5, log_every: 5}
output: {dir: runs/cai-dpo}
YAML
tunesmith train runs/cai-dpo.yaml
