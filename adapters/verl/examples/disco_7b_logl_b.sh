#!/usr/bin/env bash
# DisCO-b, log-likelihood score, 7B, lr 1e-6.
source "$(dirname "$0")/common.sh"
disco_run deepseek-ai/DeepSeek-R1-Distill-Qwen-7B 1e-6 log_likelihood disco_b 10 disco-b-7b-logl "$@"
