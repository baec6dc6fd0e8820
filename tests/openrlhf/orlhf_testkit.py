"""Helpers shared by the OpenRLHF adapter tests (imported by name: the suite runs with
``--import-mode=importlib``, and conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

N = 4  # responses per question in the tests


# ------------------------------------------------------------------------------------------
# OpenRLHF-style args
# ------------------------------------------------------------------------------------------


def make_args(**overrides: Any) -> SimpleNamespace:
    """Hierarchical args as OpenRLHF's launcher builds them (only what the tested code reads).

    ``overrides`` use dotted keys: ``make_args(**{"train.micro_batch_size": 8})``.
    """
    flat: dict[str, Any] = {
        "algo.advantage.estimator": "disco",
        "algo.advantage.gamma": 1.0,
        "algo.advantage.lambd": 1.0,
        "algo.advantage.no_std_norm": False,
        "algo.advantage.is_correction_level": "off",
        "algo.advantage.is_correction_enable": False,
        "algo.advantage.is_correction_mode": "mask",
        "algo.advantage.is_correction_type": "tis",
        "algo.advantage.is_correction_gating": "ratio",
        "algo.advantage.is_correction_threshold": [0.5, 5.0],
        "algo.kl.use_loss": False,
        "algo.kl.init_coef": 0.0,
        "algo.kl.estimator": "k1",
        "algo.kl.unbiased_gradient": False,
        "algo.disco.score": None,
        "algo.disco.objective": None,
        "algo.disco.tau": None,
        "algo.disco.delta": None,
        "algo.disco.beta": None,
        "algo.disco.kl_estimator": None,
        "algo.disco.threshold": None,
        "algo.disco.normalize": None,
        "actor.eps_clip_low_high": (0.2, 0.2),
        "actor.dual_clip": None,
        "actor.loss_agg_mode": "token-mean",
        "actor.policy_loss_type": "ppo",
        "actor.aux_loss_coef": 0.0,
        "actor.entropy_coef": None,
        "actor.num_nodes": 1,
        "actor.num_gpus_per_node": 1,
        "rollout.n_samples_per_prompt": N,
        "rollout.batch_size": 4,
        "rollout.micro_batch_size": 4,
        "rollout.max_new_tokens": 16,
        "train.batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_epochs": 1,
        "train.dynamic_batch_enable": False,
        "train.colocate_all": False,
        "train.colocate_actor_ref": False,
        "train.colocate_critic_reward": False,
        "train.async_enable": False,
        "ds.packing_samples": False,
        "ds.ring_attn_size": 1,
        "ds.tensor_parallel_size": 1,
        "data.max_len": 64,
        "reward.clip_range": (-10, 10),
        "reward.overlong_buffer_len": None,
        "reward.overlong_penalty_factor": 1.0,
        "reward.stop_properly_penalty_coef": None,
        "vllm.sync_backend": "gloo",
    }
    flat.update(overrides)
    from openrlhf.utils.config import hierarchize

    return hierarchize(SimpleNamespace(**flat))


# ------------------------------------------------------------------------------------------
# A tiny random model on disk
# ------------------------------------------------------------------------------------------

VOCAB = 32


def save_tiny_model(path: Path) -> str:
    """A 2-layer random Llama saved with save_pretrained (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return str(path)


def load_actor(path: str, temperature: float = 1.0) -> Any:
    """OpenRLHF's Actor on the tiny model, in float32 for exact gradient comparisons."""
    from openrlhf.models import Actor

    actor = Actor(path, attn_implementation="eager", param_dtype="bf16", temperature=temperature)
    actor.model.float()
    return actor


# ------------------------------------------------------------------------------------------
# Rollout samples as OpenRLHF's samples generator makes them
# ------------------------------------------------------------------------------------------


def rollout_samples(num_prompts: int, n: int, *, seed: int = 0, max_len: int = 64,
                    rewards: list[float] | None = None) -> list[Any]:
    """Samples from OpenRLHF's own ``SamplesGenerator._process_response_into_experience``, one
    prompt's n responses consecutive (as ``_generate_vllm`` appends them), ragged lengths."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    generator = SamplesGenerator.__new__(SamplesGenerator)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(num_prompts):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),),
                               generator=g).tolist()
        for k in range(n):
            length = int(torch.randint(1, 9, (1,), generator=g))
            response = torch.randint(3, VOCAB, (length,), generator=g).tolist()
            if rewards is not None:
                reward = rewards[p * n + k]
            else:
                reward = float(torch.rand((), generator=g) < 0.5)
            samples.append(generator._process_response_into_experience(
                {
                    "observation_tokens": prompt + response,
                    "action_ranges": [(len(prompt), len(prompt) + length)],
                    "reward": reward,
                    "scores": reward,
                    "prompt": f"prompt-{p}",
                    "label": f"label-{p}",
                    "rollout_log_probs": None,
                    "truncated": False,
                },
                max_len=max_len,
            ))
    return samples


@dataclass
class StandInGroup:
    """Stand-in for a RayActorGroup whose actors run ``forward`` locally (one DP rank)."""

    actor: Any

    def async_run_method_batch(self, method_name: str, **kwargs: Any) -> list[list[Any]]:
        assert method_name == "forward"
        outputs = []
        self.actor.eval()
        with torch.no_grad():
            for seq, action_mask, attention_mask in zip(
                kwargs["sequences"], kwargs["action_mask"], kwargs["attention_mask"]
            ):
                outputs.append(self.actor(seq, action_mask, attention_mask).cpu())
        return [outputs]

    def async_run_method(self, method_name: str, **kwargs: Any) -> list[Any]:
        return []


def make_experiences(args: SimpleNamespace, actor: Any, samples: list[Any]) -> list[Any]:
    """Run OpenRLHF's real ``RemoteExperienceMaker.make_experience_batch`` (patched by the
    adapter) with the actor as the only model group."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    class _Tokenizer:
        pad_token_id = 0

    strategy = SimpleNamespace(args=args)
    maker = RemoteExperienceMaker(
        StandInGroup(actor), None, None, None, FixedKLController(0.0), strategy, _Tokenizer()
    )
    return maker.make_experience_batch(samples)
