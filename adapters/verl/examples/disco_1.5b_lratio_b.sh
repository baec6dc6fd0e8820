#!/usr/bin/env bash
# DisCO-b, likelihood-ratio score, 1.5B, lr 2e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B 2e-6 likelihood_ratio disco_b 1 disco-b-1.5b-lratio "$@"
