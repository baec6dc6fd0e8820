"""Test-only CPU stand-ins for the GPU-only pieces of an OpenRLHF PPO run, and the probes the
end-to-end test reads. Installed in every process by this folder's ``sitecustomize.py`` when
``DISCOLOSS_OPENRLHF_CPU=1``; each patch is applied right after its module is first imported.

What each stand-in replaces (and nothing else is changed):

* ``torch.cuda.set_device / synchronize / current_stream / current_device`` (OpenRLHF calls
  them unconditionally; a CPU build of torch raises): no-ops, ``current_device()`` is ``"cpu"``.
* ``openrlhf.utils.deepspeed.deepspeed.init_device_mesh("cuda", ...)``: the same mesh on ``"cpu"``.
* DeepSpeed's ``FusedAdam`` (a CUDA kernel; with ``DS_ACCELERATOR=cpu`` a C++ op compiled at first
  use, many minutes on a small machine): ``"torch_adam": true`` in the AdamW config that
  ``DeepspeedStrategy.get_ds_train_config`` returns, so DeepSpeed uses ``torch.optim.AdamW``;
  likewise its shared-memory CPU all-reduce op (``deepspeed.comm.torch.build_shm_op``, compiled
  at start-up, used only by inference kernels) is not built: torch.distributed's gloo remains.
* ``NaiveReplayBuffer.__init__``'s ``torch.device(f"cuda:{current_device()}")``: ``cpu``.
* Precision: the actor in float32 (``openrlhf.utils.utils.convert_to_torch_dtype`` returns
  float32, and DeepSpeed's ``bf16`` section is disabled). OpenRLHF offers only bf16 and fp16
  (``--ds.param_dtype``); the test compares every optimizer step's gradient with a float32
  reference at 1e-5.
* ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines`` (vLLM): Ray actors generating with
  transformers (:mod:`rollout_standin`).
* ``ActorPPOTrainer._init_vllm_sync_group`` (vLLM's NCCL group between actor rank 0 and the
  engines): the same ``init_process_group`` calls on the engines, then a Ray push of each
  tensor OpenRLHF's own ``broadcast_to_vllm`` broadcasts.
* ``ray.init`` (driver): ``num_gpus`` logical GPUs so that OpenRLHF's ``num_gpus=1`` actors can be
  scheduled, and a private ``_temp_dir`` so that the test finds every Ray process it started.

Probes (observation only; they return what the wrapped method returns): ``ActorPPOTrainer.
training_step`` records each micro-batch's question ids, ``ActorPPOTrainer.ppo_train`` the
status it returns and the Lagrange multiplier around it, as JSON lines in
``$DISCOLOSS_E2E_OUT``. With ``DISCOLOSS_E2E_TRACE=1`` also, per ``ppo_train`` call and rank, a
``trace_rank<r>_<call>.pt`` file: every micro-batch's inputs (sequences, masks, old log-probs,
rewards, question ids) with the index of its optimizer step, and for every optimizer step the
actor's parameters and the gradient DeepSpeed hands to the optimizer (after its all-reduce over
the ranks, before clipping; read in ``DeepspeedStrategy.optimizer_step`` at DeepSpeed's
accumulation boundary). With ``DISCOLOSS_E2E_FAULT=old_log_probs`` the ``training_step`` probe of
the last rank puts a NaN into its first micro-batch's old log-probs (a fault on one rank).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

OUT = os.environ.get("DISCOLOSS_E2E_OUT")
FAULT = os.environ.get("DISCOLOSS_E2E_FAULT")  # "old_log_probs": see probe_training_step
TRACE = OUT is not None and os.environ.get("DISCOLOSS_E2E_TRACE") == "1"

#: The trace of the running ``ppo_train`` call (see the module docstring).
_trace: dict[str, Any] = {"micro": [], "steps": [], "calls": 0}


# --------------------------------------------------------------------------------------------
# patch a module right after it is executed
# --------------------------------------------------------------------------------------------


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[ModuleType], None]) -> None:
        self._inner, self._patch = inner, patch

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._patch(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = self.patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, patch)
        return spec


# --------------------------------------------------------------------------------------------
# stand-ins
# --------------------------------------------------------------------------------------------


def _torch_cuda(_: ModuleType) -> None:
    import torch

    # one function per name: torch._dynamo keys its rules by function object
    def set_device(device: Any) -> None:
        return None

    def synchronize(device: Any = None) -> None:
        return None

    def current_stream(device: Any = None) -> None:
        return None

    def current_device() -> str:
        return "cpu"

    for fn in (set_device, synchronize, current_stream, current_device):
        setattr(torch.cuda, fn.__name__, fn)


def _deepspeed_strategy(module: ModuleType) -> None:
    init_device_mesh = module.init_device_mesh

    def cpu_mesh(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return init_device_mesh("cpu", *args, **kwargs)

    module.init_device_mesh = cpu_mesh

    cls = module.DeepspeedStrategy
    train_config = cls.get_ds_train_config

    def get_ds_train_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = train_config(self, *args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer is not None and optimizer.get("type") == "AdamW":
            optimizer.setdefault("params", {})["torch_adam"] = True
        config["bf16"] = {"enabled": False}  # float32 (see the module docstring)
        return config

    cls.get_ds_train_config = get_ds_train_config
    if TRACE:
        optimizer_step = cls.optimizer_step

        def probe_optimizer_step(self: Any, optimizer: Any, model: Any, scheduler: Any,
                                 name: str = "model", **kwargs: Any) -> Any:
            engine = getattr(model, "model", model)
            if name == "actor" and engine.is_gradient_accumulation_boundary():
                params = dict(engine.module.named_parameters())
                _trace["steps"].append({
                    "params": {k: v.detach().clone() for k, v in params.items()},
                    "grads": {k: v.grad.detach().clone() for k, v in params.items()},
                })
            return optimizer_step(self, optimizer, model, scheduler, name=name, **kwargs)

        cls.optimizer_step = probe_optimizer_step


def _float32(module: ModuleType) -> None:
    import torch

    convert = module.convert_to_torch_dtype

    def convert_to_torch_dtype(param_dtype: str) -> Any:
        return torch.float32 if param_dtype == "bf16" else convert(param_dtype)

    module.convert_to_torch_dtype = convert_to_torch_dtype


def _deepspeed_comm(module: ModuleType) -> None:
    module.build_shm_op = lambda: None


def _replay_buffer(module: ModuleType) -> None:
    import torch

    cls = module.NaiveReplayBuffer
    init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    cls.__init__ = __init__


def _vllm_engine(module: ModuleType) -> None:
    import rollout_standin

    module.create_vllm_engines = rollout_standin.create_vllm_engines


def _ppo_actor(module: ModuleType) -> None:
    import ray
    import rollout_standin

    cls = module.ActorPPOTrainer

    def _init_vllm_sync_group(self: Any, backend: str) -> None:
        tp = self.strategy.args.vllm.tensor_parallel_size
        world = len(self.vllm_engines) * tp + 1
        ray.get([engine.init_process_group.remote("127.0.0.1", 0, i * tp + 1, world, "openrlhf",
                                                  backend=backend, use_ray=False)
                 for i, engine in enumerate(self.vllm_engines)])
        self._model_update_group = rollout_standin.RayWeightPush(self.vllm_engines)

    cls._init_vllm_sync_group = _init_vllm_sync_group
    if OUT:
        _probes(cls)


def _ray(module: ModuleType) -> None:
    init = module.init

    def ray_init(*args: Any, **kwargs: Any) -> Any:
        if not args and "address" not in kwargs and not os.environ.get("RAY_ADDRESS"):
            kwargs.setdefault("num_gpus", int(os.environ.get("DISCOLOSS_E2E_GPUS", "1")))
            kwargs.setdefault("num_cpus", 8)  # logical: placement only
            if os.environ.get("DISCOLOSS_E2E_RAY_TMP"):
                kwargs.setdefault("_temp_dir", os.environ["DISCOLOSS_E2E_RAY_TMP"])
            kwargs.setdefault("include_dashboard", False)
        return init(*args, **kwargs)

    module.init = ray_init


# --------------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------------


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def record(kind: str, **data: Any) -> None:
    """Append one JSON line to ``$DISCOLOSS_E2E_OUT/<kind>_rank<r>.jsonl``."""
    if not OUT:
        return
    with open(os.path.join(OUT, f"{kind}_rank{_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(data) + "\n")


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _multiplier(trainer: Any) -> Any:
    m = getattr(getattr(trainer, "actor_loss_fn", None), "multiplier", None)
    return None if m is None else {"value": float(m.value), "steps": int(m.steps)}


def _probes(cls: Any) -> None:
    training_step, ppo_train = cls.training_step, cls.ppo_train

    def probe_training_step(self: Any, experience: Any, *args: Any, **kwargs: Any) -> Any:
        batch = getattr(experience, "disco", None) or {}
        ids = batch.get("group_ids")
        if FAULT == "old_log_probs" and _rank() == int(os.environ["WORLD_SIZE"]) - 1:
            # the one-rank fault: a NaN old log-prob at the first response token of the
            # first response of the last rank's first micro-batch
            token = int(experience.action_mask[0].nonzero()[0])
            experience.action_log_probs[0, token] = float("nan")
            record("fault", token=token)
        record("micro", group_ids=None if ids is None else ids.tolist(),
               rewards=experience.rewards.reshape(-1).tolist())
        if TRACE:
            _trace["micro"].append({
                "step": len(_trace["steps"]),
                "sequences": experience.sequences.detach().cpu().clone(),
                "attention_mask": experience.attention_mask.detach().cpu().clone(),
                "action_mask": experience.action_mask.detach().cpu().clone(),
                "old": experience.action_log_probs.detach().cpu().clone(),
                "rewards": experience.rewards.detach().cpu().reshape(-1).clone(),
                "group_ids": ids.detach().cpu().clone(),
            })
        return training_step(self, experience, *args, **kwargs)

    def probe_ppo_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        before = _multiplier(self)
        status = ppo_train(self, *args, **kwargs)
        record("ppo_train", status={k: _number(v) for k, v in status.items()},
               multiplier_before=before, multiplier_after=_multiplier(self))
        if TRACE:
            torch.save({"micro": _trace["micro"], "steps": _trace["steps"]},
                       os.path.join(OUT, f"trace_rank{_rank()}_{_trace['calls']}.pt"))
            _trace.update(micro=[], steps=[], calls=_trace["calls"] + 1)
        return status

    cls.training_step = probe_training_step
    cls.ppo_train = probe_ppo_train


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "openrlhf": _torch_cuda,
    "openrlhf.utils.utils": _float32,
    "openrlhf.utils.deepspeed.deepspeed": _deepspeed_strategy,
    "deepspeed.comm.torch": _deepspeed_comm,
    "openrlhf.trainer.ppo_utils.replay_buffer": _replay_buffer,
    "openrlhf.trainer.ray.vllm_engine": _vllm_engine,
    "openrlhf.trainer.ray.ppo_actor": _ppo_actor,
    "ray": _ray,
}


def install() -> None:
    """Patch the modules above when they are first imported (none is imported yet)."""
    already = sorted(name for name in PATCHES if name in sys.modules)
    if already:
        raise RuntimeError(f"orlhf_cpu.install: {already} already imported")
    sys.meta_path.insert(0, _AfterImport(PATCHES))
