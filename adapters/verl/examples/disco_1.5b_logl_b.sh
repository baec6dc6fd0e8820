#!/usr/bin/env bash
# DisCO-b (mean over negatives), log-likelihood score, 1.5B, lr 2e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B 2e-6 log_likelihood disco_b 10 disco-b-1.5b-logl "$@"
