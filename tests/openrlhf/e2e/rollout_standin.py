"""Test-only stand-in for OpenRLHF's vLLM rollout actor (``openrlhf.trainer.ray.vllm_engine.
RolloutRayActor``, GPU-only) built on transformers' ``generate``, and for the NCCL group that
pushes the actor's weights to it.

:class:`HFRolloutActor` has the methods OpenRLHF calls on a rollout actor: ``generate_responses``
(through OpenRLHF's own ``SingleTurnAgentExecutor``, which tokenizes, calls :meth:`generate`
and scores with ``--reward.remote_url``), ``get_num_unfinished_requests``,
``init_process_group``, ``update_weight``, ``sleep``/``wake_up``, ``reset_prefix_cache``.
OpenRLHF's ``broadcast_to_vllm`` calls ``update_weight(name, dtype, shape)`` on every engine and
then broadcasts the tensor over the NCCL group; here :class:`RayWeightPush` is that group and
sends the tensor with :meth:`HFRolloutActor.receive_weight`. The actor is a plain (not async)
Ray actor, so the two calls run in the order they are made.

With ``$DISCOLOSS_E2E_OUT`` set, the engine writes its weights after every complete sync
(``engine<i>_sync<k>.pt``) and one JSON line per generated response (``generate_engine<i>.jsonl``:
the number of syncs it had received).
"""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace
from typing import Any

import ray
import torch

OUT = os.environ.get("DISCOLOSS_E2E_OUT")


class _Engine:
    """What ``SingleTurnAgentExecutor.execute`` awaits as ``llm_engine``."""

    def __init__(self, actor: HFRolloutActor) -> None:
        self.actor = actor

    async def generate(self, prompt_token_ids: list[int], sampling_params: Any,
                       multi_modal_data: Any = None) -> Any:
        return self.actor.generate(prompt_token_ids, sampling_params, multi_modal_data)


@ray.remote
class HFRolloutActor:
    def __init__(self, model: str, seed: int = 0, max_model_len: int = 2048,
                 remote_rm_url: Any = None, agent_func_path: Any = None, index: int = 0,
                 **ignored: Any) -> None:
        from openrlhf.utils.agent import SingleTurnAgentExecutor
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if agent_func_path:
            raise NotImplementedError("the rollout stand-in runs single-turn rollouts only")
        torch.manual_seed(seed)
        self.index = index
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.executor = SingleTurnAgentExecutor(remote_rm_url)
        self.pending: tuple[str, Any, Any, bool] | None = None
        self.syncs = 0
        self.sleeping = False
        self.group: dict[str, Any] | None = None

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[int], sampling_params: Any,
                 multi_modal_data: Any = None) -> Any:
        """One sampled continuation, shaped like vLLM's ``RequestOutput``."""
        if multi_modal_data:
            raise NotImplementedError("the rollout stand-in is text-only")
        if self.sleeping:
            raise RuntimeError("generate called on a sleeping engine")
        sp = sampling_params
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor([prompt_token_ids], dtype=torch.long)
        top_k = getattr(sp, "top_k", -1)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True,
                temperature=sp.temperature, top_p=sp.top_p,
                top_k=0 if top_k is None or top_k < 0 else top_k,
                max_new_tokens=sp.max_tokens, min_new_tokens=getattr(sp, "min_tokens", 1) or 0,
                eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
            )
        tokens = out[0, ids.shape[1]:].tolist()
        finish = "length"
        if eos in tokens:
            tokens, finish = tokens[:tokens.index(eos) + 1], "stop"
        if OUT:
            with open(os.path.join(OUT, f"generate_engine{self.index}.jsonl"), "a") as f:
                f.write(json.dumps({"syncs": self.syncs, "tokens": len(tokens)}) + "\n")
        completion = SimpleNamespace(token_ids=tokens, finish_reason=finish, logprobs=None,
                                     text=self.tokenizer.decode(tokens))
        return SimpleNamespace(outputs=[completion])

    def generate_responses(self, prompt: str, label: str, sampling_params: Any, max_length: int,
                           hf_tokenizer: Any, num_samples: int = 1, images: Any = None
                           ) -> list[dict[str, Any]]:
        """OpenRLHF's ``RolloutRayActor.generate_responses``: ``num_samples`` executor runs."""
        engine = _Engine(self)

        async def run() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*[
                self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params,
                                      max_length=max_length, hf_tokenizer=hf_tokenizer,
                                      llm_engine=engine, images=images)
                for _ in range(num_samples)
            ]))

        return asyncio.run(run())

    def get_num_unfinished_requests(self) -> int:
        return 0

    # --- weight sync -----------------------------------------------------------------------

    def init_process_group(self, master_address: str, master_port: int, rank_offset: int,
                           world_size: int, group_name: str, backend: str, use_ray: bool) -> None:
        self.group = {"rank": rank_offset, "world_size": world_size, "name": group_name}

    def update_weight(self, name: str, dtype: Any, shape: Any, empty_cache: bool = False) -> None:
        if self.group is None:
            raise RuntimeError("update_weight before init_process_group")
        self.pending = (name, dtype, tuple(shape), bool(empty_cache))

    def receive_weight(self, tensor: torch.Tensor) -> None:
        """The tensor OpenRLHF broadcasts after ``update_weight`` (the NCCL group's job)."""
        if self.pending is None:
            raise RuntimeError("a weight arrived without update_weight")
        name, dtype, shape, last = self.pending
        self.pending = None
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, announced "
                               f"{shape} {dtype}")
        with torch.no_grad():
            self.model.get_parameter(name).copy_(tensor)
        if last:  # OpenRLHF flags the last parameter of a sync with empty_cache=True
            self.syncs += 1
            if OUT:
                torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                           os.path.join(OUT, f"engine{self.index}_sync{self.syncs}.pt"))

    def reset_prefix_cache(self) -> None:
        pass

    def sleep(self, level: int = 1) -> None:
        self.sleeping = True

    def wake_up(self, tags: Any = None) -> None:
        self.sleeping = False


class RayWeightPush:
    """Stands in for the NCCL group of ``ActorPPOTrainer._init_vllm_sync_group``: ``broadcast``
    sends the tensor to every engine through Ray."""

    def __init__(self, engines: list[Any]) -> None:
        self.engines = engines

    def broadcast(self, tensor: torch.Tensor, src: int = 0, stream: Any = None) -> None:
        data = tensor.detach().to("cpu").clone()
        ray.get([engine.receive_weight.remote(data) for engine in self.engines])


def create_vllm_engines(num_engines: int, tensor_parallel_size: int, pretrain: str, seed: int,
                        *args: Any, agent_func_path: Any = None, remote_rm_url: Any = None,
                        **kwargs: Any) -> list[Any]:
    """Stands in for ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines``: ``num_engines``
    CPU rollout actors (no GPU, no placement group; tensor parallelism is not modelled)."""
    if tensor_parallel_size != 1:
        raise NotImplementedError("the rollout stand-in has no tensor parallelism")
    max_len = args[3] if len(args) > 3 else kwargs.get("max_model_len", 2048)
    return [HFRolloutActor.options(num_cpus=0).remote(
        model=pretrain, seed=seed + i, max_model_len=max_len, remote_rm_url=remote_rm_url,
        agent_func_path=agent_func_path, index=i)
        for i in range(num_engines)]
