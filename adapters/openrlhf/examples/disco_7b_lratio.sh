#!/usr/bin/env bash
# DisCO on OpenRLHF: DeepSeek-R1-Distill-Qwen-7B, DisCO, likelihood-ratio score.
set -euo pipefail
: "${MICRO_BATCH_SIZE:=1}"  # one 8k-token response per micro-batch
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
disco_launch disco-7b-lratio \
  --actor.model_name_or_path "${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}" \
  --actor.adam.lr 1e-6 \
  --algo.disco.score likelihood_ratio --algo.disco.objective disco --algo.disco.tau 1 \
  "$@"
