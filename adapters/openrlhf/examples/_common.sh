# Shared by the DisCO example launchers (sourced). Paper settings (arXiv 2505.12366, DESIGN.md
# section 1): 128 questions x 8 responses per step, mini-batches of 32 questions, 1 epoch,
# temperature 0.6, 8k-token responses, no reference model, no entropy bonus,
# delta 1e-4, beta 1e3, tau 10 (log-likelihood) / 1 (likelihood ratio).
#
# Environment:
#   RAY_ADDRESS   submit with `ray job submit` to this cluster (unset: run the driver directly)
#   WORKING_DIR   job working dir shipped to the cluster (default: this folder, which holds the
#                 reward function). discoloss itself must be pip-installed on every node; do
#                 not ship a discoloss source checkout as working_dir: its discoloss/ folder
#                 would shadow the installed package (and its adapters) in the Ray workers.
#   DATASET       prompt dataset (default: agentica-org/DeepScaleR-Preview-Dataset)
#   PYTHON        interpreter (default: python3)
#   SAVE_PATH     output directory (default: ./ckpt/<run name>)
#   MICRO_BATCH_SIZE  responses per actor micro-batch (default: 2; the 7B scripts: 1). Any size
#                 is exact with --algo.disco.weights current (the default): one optimizer step
#                 is 256 responses (32 questions), 32 per GPU, whatever the micro-batch size.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${DATASET:=agentica-org/DeepScaleR-Preview-Dataset}"
: "${WORKING_DIR:=$HERE}"
: "${PYTHON:=python3}"

disco_launch() {
  local run_name="$1"; shift
  local launch=() reward="$HERE/math_reward.py"
  if [[ -n "${RAY_ADDRESS:-}" ]]; then
    launch=(ray job submit --address="$RAY_ADDRESS"
            --runtime-env-json="{\"working_dir\": \"$WORKING_DIR\"}" --)
    reward=math_reward.py  # relative to the job's working_dir
  fi
  "${launch[@]}" "$PYTHON" -m discoloss.adapters.openrlhf.train_ppo_ray \
    --data.prompt_dataset "$DATASET" --data.input_key problem --data.label_key answer \
    --data.apply_chat_template \
    --reward.remote_url "$reward" \
    --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
    --vllm.num_engines 8 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.6 \
    --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
    --ds.zero_stage 3 --ds.param_dtype bf16 --ds.packing_samples \
    --actor.gradient_checkpointing_enable \
    --rollout.n_samples_per_prompt 8 --rollout.batch_size 128 --rollout.micro_batch_size 16 \
    --rollout.temperature 0.6 --rollout.max_new_tokens 8192 --data.max_len 9216 \
    --train.batch_size 256 --train.micro_batch_size "${MICRO_BATCH_SIZE:-2}" --train.max_epochs 1 \
    --train.num_episodes 1 \
    --algo.kl.init_coef 0 \
    --algo.advantage.estimator disco \
    --algo.disco.delta 1e-4 --algo.disco.beta 1e3 \
    --ckpt.output_dir "${SAVE_PATH:-./ckpt/$run_name}" --ckpt.save_steps 50 \
    --logger.wandb.run_name "$run_name" \
    "$@"
}
