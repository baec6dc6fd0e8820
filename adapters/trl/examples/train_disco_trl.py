"""Train a causal LM with DisCO in TRL, end to end on a CPU (tiny random model, no downloads).

    pip install torch && pip install -e ".[trl]"   # in a discoloss checkout
    python train_disco_trl.py --output-dir disco_out

For a real run, pass a model name to DisCOTrainer and use your task's dataset and checker.
"""

from __future__ import annotations

import argparse
import random

import torch
from datasets import Dataset
from discoloss.adapters.trl import DisCOConfig, DisCOTrainer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = ["<pad>", "<eos>", *"0123456789+="]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build_dataset(n: int = 64, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]
    return Dataset.from_dict(
        {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )


def parity_reward(completions: list[str], answer: list[str], **kwargs: object) -> list[float]:
    """Verifiable toy reward: 1 if the completion starts with a digit of the sum's parity."""
    return [
        float(c[:1].isdigit() and int(c[0]) % 2 == int(a) % 2) for c, a in zip(completions, answer)
    ]


def make_trainer(output_dir: str, max_steps: int) -> DisCOTrainer:
    config = DisCOConfig(  # was: GRPOConfig
        output_dir=output_dir,
        objective="disco",  # the DisCO options, defaults shown
        score="log_likelihood",
        disco_delta=1e-4,  # KL radius (GRPOConfig.delta is GRPO's clipping bound)
        disco_beta=1e3,  # penalty strength (GRPOConfig.beta is the reference-KL coefficient)
        weights="current",  # each step's weights at its own parameters (exact); or "sampling"
        num_generations=8,  # completions per prompt (>= 2)
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        steps_per_generation=4,  # 2 optimizer steps per pass over a generation batch
        num_iterations=2,  # 2 passes: 4 optimizer steps per generation batch
        max_completion_length=4,
        temperature=1.0,
        learning_rate=1e-3,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    return DisCOTrainer(  # was: GRPOTrainer
        model=build_model(),
        reward_funcs=parity_reward,
        args=config,
        train_dataset=build_dataset(),
        processing_class=build_tokenizer(),
    )


def main(argv: list[str] | None = None) -> DisCOTrainer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="disco_out")
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args(argv)
    trainer = make_trainer(args.output_dir, args.max_steps)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
