#!/usr/bin/env bash
# DisCO, likelihood-ratio score (tau 1), 7B, lr 1e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-7B 1e-6 likelihood_ratio disco 1 disco-7b-lratio "$@"
