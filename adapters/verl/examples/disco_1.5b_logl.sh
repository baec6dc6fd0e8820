#!/usr/bin/env bash
# DisCO, log-likelihood score (tau 10), DeepSeek-R1-Distill-Qwen-1.5B, lr 2e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B 2e-6 log_likelihood disco 10 disco-1.5b-logl "$@"
