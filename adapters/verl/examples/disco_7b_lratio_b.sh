#!/usr/bin/env bash
# DisCO-b, likelihood-ratio score, 7B, lr 1e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-7B 1e-6 likelihood_ratio disco_b 1 disco-b-7b-lratio "$@"
