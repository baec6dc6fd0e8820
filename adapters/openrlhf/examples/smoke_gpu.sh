#!/usr/bin/env bash
# GPU smoke test of DisCO on OpenRLHF: 1 GPU, a small instruct model, 2 training steps on
# generated arithmetic questions, micro-batches of 2 responses with the default
# --algo.disco.weights current (one optimizer step of 8 questions, planned as a whole). Passes
# when the run finishes and the trainer logged DisCO metrics (which only the DisCO loss inside
# the Ray actors produces), including the planning time of the per-step weights.
#
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct bash adapters/openrlhf/examples/smoke_gpu.sh
#
# Needs a GPU install of OpenRLHF 0.11.x (vLLM, flash-attn) and `pip install -e .` of discoloss.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${MODEL:=Qwen/Qwen2.5-0.5B-Instruct}"
: "${PYTHON:=python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - "$WORK/train.jsonl" <<'PY'
import json, random, sys
random.seed(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        a, b = random.randint(1, 99), random.randint(1, 99)
        f.write(json.dumps({"problem": f"What is {a} + {b}? Put the final answer in \\boxed{{}}.",
                            "answer": str(a + b)}) + "\n")
PY

"$PYTHON" -m discoloss.adapters.openrlhf.train_ppo_ray \
  --actor.model_name_or_path "$MODEL" \
  --data.prompt_dataset "$WORK/train.jsonl" --data.input_key problem --data.label_key answer \
  --data.apply_chat_template --data.max_samples 32 \
  --reward.remote_url "$HERE/math_reward.py" \
  --actor.num_nodes 1 --actor.num_gpus_per_node 1 \
  --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.4 \
  --train.colocate_all --vllm.enable_sleep --ds.enable_sleep --ds.zero_stage 2 \
  --rollout.n_samples_per_prompt 4 --rollout.batch_size 16 --rollout.micro_batch_size 8 \
  --rollout.temperature 0.6 --rollout.max_new_tokens 256 --data.max_len 512 \
  --train.batch_size 32 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 1 \
  --actor.adam.lr 2e-6 --algo.kl.init_coef 0 \
  --algo.advantage.estimator disco --algo.disco.score log_likelihood --algo.disco.tau 10 \
  --algo.disco.beta 1e3 --algo.disco.delta 1e-4 \
  --ckpt.output_dir "$WORK/ckpt" 2>&1 | tee "$WORK/log.txt"

grep -q "disco/objective" "$WORK/log.txt" || { echo "smoke: no DisCO metrics in the log" >&2; exit 1; }
grep -q "disco/plan_seconds" "$WORK/log.txt" || { echo "smoke: no planned weights in the log" >&2; exit 1; }
echo "smoke: OK"
