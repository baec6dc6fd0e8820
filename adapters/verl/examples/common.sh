#!/usr/bin/env bash
# Shared launcher for the paper's settings (DisCO, arXiv 2505.12366): 128 questions x 8
# responses per step, mini-batches of 32 questions, 1 epoch, temperature 0.6, responses up to
# 8k tokens, no entropy bonus, no reference model, delta 1e-4, beta 1e3.
# Usage (from a thin script): disco_run MODEL LR SCORE OBJECTIVE TAU NAME [extra overrides...]
# Environment: TRAIN, VAL (parquet files in verl's RL format), NNODES (1), GPUS (8),
# MICRO (per-GPU micro-batch in responses, any divisor of the per-GPU mini-batch: the
# default weights=current is exact at any size), TP (rollout tensor parallel size).
set -euo pipefail

disco_run() {
    local model="$1" lr="$2" score="$3" objective="$4" tau="$5" name="$6"
    shift 6
    python3 -m verl.trainer.main_ppo \
        --config-path=pkg://discoloss.adapters.verl.conf --config-name=disco_trainer \
        actor_rollout_ref.actor.policy_loss.score="$score" \
        actor_rollout_ref.actor.policy_loss.objective="$objective" \
        actor_rollout_ref.actor.policy_loss.tau="$tau" \
        actor_rollout_ref.actor.policy_loss.delta=1e-4 \
        actor_rollout_ref.actor.policy_loss.beta=1e3 \
        data.train_files="${TRAIN:?set TRAIN}" data.val_files="${VAL:?set VAL}" \
        data.train_batch_size=128 data.max_prompt_length=1024 data.max_response_length=8192 \
        actor_rollout_ref.model.path="$model" \
        actor_rollout_ref.actor.optim.lr="$lr" \
        actor_rollout_ref.actor.ppo_mini_batch_size=32 \
        actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="${MICRO:-2}" \
        actor_rollout_ref.actor.ppo_epochs=1 \
        actor_rollout_ref.rollout.n=8 \
        actor_rollout_ref.rollout.temperature=0.6 \
        actor_rollout_ref.rollout.name=vllm \
        actor_rollout_ref.rollout.tensor_model_parallel_size="${TP:-1}" \
        actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
        actor_rollout_ref.model.enable_gradient_checkpointing=true \
        trainer.project_name=disco trainer.experiment_name="$name" \
        trainer.n_gpus_per_node="${GPUS:-8}" trainer.nnodes="${NNODES:-1}" \
        trainer.total_training_steps=1400 trainer.save_freq=100 trainer.test_freq=50 \
        "$@"
}
