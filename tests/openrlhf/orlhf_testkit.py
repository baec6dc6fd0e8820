"""Test utilities shared by the OpenRLHF adapter tests (imported by name: the suite runs with
``--import-mode=importlib``, and conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from discoloss.adapters.openrlhf.patch import BATCH_ATTR

from discoloss import disco_loss, kl_divergence
from discoloss.constraints import constraint_penalty

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
        "algo.disco.constraint": None,
        "algo.disco.cvar_alpha": None,
        "algo.disco.margin": None,
        "algo.disco.clip_eps": None,
        "algo.disco.lam": None,
        "algo.disco.max_length": None,
        "algo.disco.lagrangian_lr": None,
        "algo.disco.weights": None,
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
        "train.max_tokens_per_gpu": 16192,
        "rollout.max_tokens_per_gpu": 16192,
        "train.seed": 42,
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


def save_tiny_model(path: Path, p_eos: float | None = None) -> str:
    """A 2-layer random Llama saved with save_pretrained (no hub); with ``p_eos``, tuned to end
    a response with about that probability at every token (a random model almost never ends
    before the length cap, so all its responses would have the same length): the verl suite's
    ``raise_eos`` (tests/verl/verl_e2e_kit.py, seeded, about a second)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    if p_eos is not None:
        spec = importlib.util.spec_from_file_location(
            "verl_e2e_kit", Path(__file__).resolve().parents[1] / "verl" / "verl_e2e_kit.py")
        assert spec is not None and spec.loader is not None
        kit = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
        spec.loader.exec_module(kit)  # stdlib imports only at module level
        kit.raise_eos(model, config.eos_token_id, VOCAB, p_eos=p_eos)
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


# ------------------------------------------------------------------------------------------
# Trainer side
# ------------------------------------------------------------------------------------------


class DeepSpeedLikeStrategy:
    """What ActorPPOTrainer calls on OpenRLHF's DeepspeedStrategy, with DeepSpeed's semantics:
    ``engine.backward`` divides the loss by the accumulation steps, ``engine.step`` only steps at
    the accumulation boundary, where gradients are averaged over the data-parallel ranks."""

    def __init__(self, args: Any, accumulated_gradient: int) -> None:
        self.args = args
        self.accumulated_gradient = accumulated_gradient
        self.ring_attn_group = None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():  # OpenRLHF's (dp, sp, tp) mesh
            from torch.distributed.device_mesh import init_device_mesh

            self.ds_device_mesh = init_device_mesh(
                "cpu", (dist.get_world_size(), 1, 1), mesh_dim_names=("dp", "sp", "tp"))
        self.calls = 0
        self.backwards = 0
        self.step_grads: list[list[torch.Tensor]] = []
        #: per optimizer step: the parameters its gradient was computed at, and the number of
        #: backward calls (micro-batches) since the start when it was taken
        self.step_params: list[dict[str, torch.Tensor]] = []
        self.step_backwards: list[int] = []

    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any) -> None:
        self.backwards += 1
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer: Any, model: Any, scheduler: Any, name: str = "") -> None:
        self.calls += 1
        if self.calls % self.accumulated_gradient:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.step_grads.append([p.grad.detach().clone() for p in params])
        self.step_params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.step_backwards.append(self.backwards)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def get_grad_norm(self, model: Any) -> float:
        return 0.0

    def save_ckpt(self, model: Any, save_dir: str, tag: str | None = None, max_num: int = 3,
                  max_mem: int = 1000, client_state: Any = None, save_latest: bool = True,
                  metric_value: Any = None, metric_key: Any = None) -> None:
        """DeepSpeed's layout: the model's state in ``save_dir/<tag>/``, the tag in ``latest``."""
        import os

        tag = tag or "global_step0"
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(model.state_dict(), os.path.join(save_dir, tag, "model_states.pt"))
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w") as f:
                f.write(tag)

    def all_reduce(self, data: Any, op: str = "mean") -> Any:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return data
        if isinstance(data, dict):
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        if isinstance(data, torch.Tensor):  # DeepSpeed keeps a tensor's dtype
            t = data.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            return t / dist.get_world_size() if op == "mean" else t
        t = torch.as_tensor(data, dtype=torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
        return t.item()

    def is_rank_0(self) -> bool:
        dist = torch.distributed
        return not dist.is_initialized() or dist.get_rank() == 0

    def print(self, *msg: Any) -> None:
        pass


def build_trainer(args: Any, actor: Any, *, micro: int, gas: int, monkeypatch: Any,
                  lr: float = 1e-2) -> tuple[Any, DeepSpeedLikeStrategy]:
    from openrlhf.trainer.ray import ppo_actor

    strategy = DeepSpeedLikeStrategy(args, gas)
    optim = torch.optim.SGD(actor.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "current_device", lambda: 0)  # replay buffer's target device name
        trainer = ppo_actor.ActorPPOTrainer(
            strategy, actor, ema_model=None, actor_optim=optim, actor_scheduler=sched,
            micro_train_batch_size=micro, tokenizer=None, dataloader_pin_memory=False,
        )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # ppo_train's device
    return trainer, strategy


def record_micro_batches(monkeypatch: Any) -> list[dict[str, Any]]:
    """Spy on the (patched) training_step: what each micro-batch held."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    seen: list[dict[str, Any]] = []
    step = ActorPPOTrainer.training_step

    def spy(self: Any, experience: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({
            "sequences": experience.sequences.clone(),
            "attention_mask": experience.attention_mask.clone(),
            "action_mask": experience.action_mask.clone(),
            "old": experience.action_log_probs.clone(),
            "rewards": experience.rewards.clone(),
            "group_ids": (getattr(experience, BATCH_ATTR)["group_ids"].clone()
                          if hasattr(experience, BATCH_ATTR) else None),
        })
        return step(self, experience, *args, **kwargs)

    monkeypatch.setattr(ActorPPOTrainer, "training_step", spy)
    return seen


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def reference_gradient(actor0: Any, micro: list[dict[str, Any]], settings: dict[str, Any],
                       *, local_penalty: bool) -> list[torch.Tensor]:
    """Gradient of DisCO on the mini-batch made of ``micro``, at the parameters ``actor0``:
    ``disco_loss`` on the concatenated mini-batch; with ``local_penalty`` its penalty replaced by
    the token-weighted mean of the micro-batch penalties (the adapter's stated rule), each the
    selected constraint's penalty of the micro-batch's own token-mean KL."""
    actor0.zero_grad()
    log_probs = [actor0(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
                 for m in micro]
    out = disco_loss(
        pad_cat(log_probs), pad_cat([m["old"] for m in micro]),
        pad_cat([m["action_mask"] for m in micro]).bool(),
        torch.cat([m["rewards"] for m in micro]), torch.cat([m["group_ids"] for m in micro]),
        **settings,
    )
    if not local_penalty:
        loss = out.loss
    else:
        tokens = [m["action_mask"].sum() for m in micro]
        total = sum(tokens)
        penalty = sum(
            t / total * constraint_penalty(
                kl_divergence(lp, m["old"], m["action_mask"].bool(),
                              estimator=settings.get("kl_estimator", "k1")),
                constraint=settings.get("constraint", "squared_hinge"),
                delta=settings["delta"], beta=settings["beta"])
            for t, lp, m in zip(tokens, log_probs, micro)
        )
        loss = -out.objective + penalty
    loss.backward()
    return [p.grad.detach().clone() for p in actor0.parameters() if p.requires_grad]


def shifted(experiences: list[Any], seed: int, shift: float) -> list[Any]:
    """Move the old log-probs away from the current ones so that KL(pi_old || pi_theta) > delta
    and differs between micro-batches."""
    g = torch.Generator().manual_seed(seed)
    for exp in experiences:
        noise = shift * (1 + torch.rand(exp.action_log_probs.shape, generator=g))
        exp.action_log_probs = exp.action_log_probs + noise * exp.action_mask
    return experiences


def save_tiny_model_with_tokenizer(path: Path, p_eos: float | None = None) -> str:
    """:func:`save_tiny_model` plus a word-level tokenizer over its vocabulary (``<pad>``,
    ``<s>``, ``</s>``, ``<unk>``, then the words ``w4`` ... ``w31``), saved with
    ``save_pretrained`` (no hub): what OpenRLHF's launcher and a rollout engine load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    save_tiny_model(path, p_eos=p_eos)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
             **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return str(path)
