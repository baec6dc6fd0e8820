#!/usr/bin/env bash
# GPU smoke test: a tiny random Qwen2 model built from a config, a synthetic a+b dataset,
# 3 DisCO steps on one GPU with the default weights=current: micro-batches of 2 responses
# (questions of 4 split across them), two mini-batches per step (the second one plans from the
# current-parameter forward pass). Needs verl[vllm] and discoloss[verl].
# Usage: smoke_gpu.sh [OUT_DIR [overrides...]]
set -euo pipefail
OUT="${1:-/tmp/disco_smoke}"
if [ $# -gt 0 ]; then shift; fi  # the rest are extra overrides
mkdir -p "$OUT"
python3 - "$OUT" <<'PY'
import sys, random, pandas as pd
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
out = sys.argv[1]
chars = list("0123456789+= ") + ["<pad>", "<eos>"]
tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
fast.save_pretrained(f"{out}/model")
cfg = Qwen2Config(vocab_size=len(chars), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=chars.index("<pad>"), eos_token_id=chars.index("<eos>"))
Qwen2ForCausalLM(cfg).save_pretrained(f"{out}/model")
rng = random.Random(0)
rows = []
for i in range(256):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    rows.append({"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                 "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                 "extra_info": {"index": i}})
pd.DataFrame(rows).to_parquet(f"{out}/train.parquet")
pd.DataFrame(rows[:32]).to_parquet(f"{out}/val.parquet")
PY
python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=disco \
    actor_rollout_ref.actor.policy_loss.loss_mode=disco \
    data.train_files="$OUT/train.parquet" data.val_files="$OUT/val.parquet" \
    data.train_batch_size=16 data.max_prompt_length=16 data.max_response_length=8 \
    actor_rollout_ref.model.path="$OUT/model" \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.actor.ppo_mini_batch_size=8 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    actor_rollout_ref.actor.entropy_coeff=0 actor_rollout_ref.actor.use_kl_loss=false \
    trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_training_steps=3 \
    trainer.test_freq=-1 trainer.save_freq=-1 trainer.logger=[console] \
    trainer.default_local_dir="$OUT/ckpt" "$@" 2>&1 | tee "$OUT/smoke.log"
grep -q "actor/disco/objective" "$OUT/smoke.log"
grep -q "actor/disco/plan_seconds" "$OUT/smoke.log"
grep "actor/disco/whole_questions" "$OUT/smoke.log" | tail -1
