#!/usr/bin/env bash
# DisCO on OpenRLHF: DeepSeek-R1-Distill-Qwen-1.5B, DisCO-b, log-likelihood score.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
disco_launch disco-b-1.5b-logl \
  --actor.model_name_or_path "${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}" \
  --actor.adam.lr 2e-6 \
  --algo.disco.score log_likelihood --algo.disco.objective disco_b --algo.disco.tau 10 \
  "$@"
