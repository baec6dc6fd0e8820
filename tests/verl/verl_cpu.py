"""Stand-ins that let verl 0.9.1's own ``main_ppo`` train on a machine without a GPU.

Imported in the driver and in every Ray worker through ``VERL_USE_EXTERNAL_MODULES=verl_cpu``
(with this folder on ``PYTHONPATH``), i.e. from inside ``import verl``. Everything else is
verl's real code and the discoloss adapter unmodified. What each piece replaces:

* :class:`CPUPlatform`, verl's ``cpu`` platform (replaces the CUDA platform): a
  ``PlatformBase`` whose device module forwards to ``torch.cpu`` and turns streams, memory
  statistics and profiler hooks into no-ops; collectives use gloo. Its Ray resource is still
  "GPU" because verl's resource pools count only GPU/NPU resources: the driver starts Ray with
  fake GPUs (``+ray_kwargs.ray_init.num_gpus=N``) and ``VERL_ENGINE_DEVICE=cuda`` selects the
  FSDP engine (registered for cuda/npu only), which then runs on CPU through this platform.
* :class:`HFReplica` / :class:`HFServer` (replace the vLLM server): ``rollout.name=hf``; a Ray
  actor that samples token-in/token-out with a transformers model (temperature sampling,
  per-token log-probs) and receives the trained weights on every weight sync.
* :class:`HFServerAdapter` (replaces vLLM's ``ServerAdapter`` in the actor workers): pushes the
  trainer's full state dict to the replica's server in ``update_weights``.
* the process-group patch: verl builds the backend string ``"cpu:gloo,cpu:gloo"`` on a CPU
  platform, which torch rejects; ``initialize_global_process_group_ray`` gets ``"gloo"``.

Test instrumentation (off unless ``DISCO_E2E_DIR`` names a folder), none of it changes what
verl or the adapter compute: every call of the policy loss is recorded (rank, grad mode, the
prompt and response token ids of each row, log-probs, codes), every optimizer step's full
gradient (before clipping) and the full parameters it was computed at are written by the
actor (rank 0), with every step's parameter fingerprint; every mini-batch plan's metrics
(``weights=current/sampling``) are recorded; and the rollout server writes the fingerprint of
every weight update it receives. ``DISCO_E2E_FAULT=rank:step``
puts a NaN into one old log-prob of one response token on that rank in that training step (a
fault seen by one rank only).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import types
from typing import Any

import torch
from verl.plugin.platform import PlatformRegistry, set_platform
from verl.plugin.platform.platform_base import PlatformBase

RECORD_DIR = os.environ.get("DISCO_E2E_DIR", "")
FAULT = os.environ.get("DISCO_E2E_FAULT", "")


# --------------------------------------------------------------------------------------------
# platform


def _noop(*args: Any, **kwargs: Any) -> Any:
    return None


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _Event:
        return _Event()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


class _Event(_Stream):
    def record(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, *args: Any) -> float:
        return 0.0


class _CPUDevice(types.ModuleType):
    """``torch.cpu`` where it has the function, a harmless stand-in where it has not."""

    def __init__(self) -> None:
        super().__init__("verl_cpu_device")
        self.Stream = _Stream
        self.Event = _Event

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name in (
            "memory_allocated",
            "memory_reserved",
            "max_memory_allocated",
            "max_memory_reserved",
        ):
            return lambda *a, **k: 0
        if name == "mem_get_info":
            return lambda *a, **k: (1 << 34, 1 << 34)
        if name == "memory_stats":
            return lambda *a, **k: {}
        if name in ("stream",):
            return lambda *a, **k: contextlib.nullcontext()
        if name in ("current_stream", "default_stream"):
            return lambda *a, **k: _Stream()
        if name == "is_available":
            return lambda: True
        if name == "device_count":
            return lambda: 1
        if name == "current_device":
            return lambda: "cpu"
        if name == "get_device_name":
            return lambda *a, **k: "cpu"
        if name.startswith("_"):
            raise AttributeError(name)
        return _noop


class CPUPlatform(PlatformBase):
    """verl platform ``cpu``: tensors on the CPU, gloo collectives, Ray's "GPU" resource."""

    device_name = "cpu"
    vendor_name = "cpu"

    def __init__(self) -> None:
        self._module = _CPUDevice()

    @property
    def device_module(self) -> types.ModuleType:  # type: ignore[override]
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> Any:  # type: ignore[override]
        return "cpu"  # used as ``tensor.to(get_device_id())``

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Any:
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"  # verl's resource pools count GPU/NPU only: Ray gets fake GPUs

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    @property
    def cudart(self) -> Any:
        return None


PlatformRegistry.register(platform="cpu")(CPUPlatform)
set_platform(CPUPlatform())


# --------------------------------------------------------------------------------------------
# patches applied when a verl module is first imported


_PATCHES: dict[str, list[Any]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs the patches registered for a module right after it is first imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader, patches = spec.loader, _PATCHES[fullname]

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: types.ModuleType) -> None:
                loader.exec_module(module)  # type: ignore[union-attr]
                for patch in patches:
                    patch(module)

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _AfterImport())


def after_import(name: str, patch: Any) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        _PATCHES.setdefault(name, []).append(patch)


def _gloo_process_group(module: types.ModuleType) -> None:
    original = module.initialize_global_process_group_ray

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second: Any = None, backend: Any = None):
        return original(timeout_second=timeout_second, backend="gloo")

    module.initialize_global_process_group_ray = initialize_global_process_group_ray


after_import("verl.utils.distributed", _gloo_process_group)


def _engine_workers(module: types.ModuleType) -> None:
    # engine_workers imported the function by name before any patch could see it
    import verl.utils.distributed as vd

    module.initialize_global_process_group_ray = vd.initialize_global_process_group_ray


after_import("verl.workers.engine_workers", _engine_workers)


# --------------------------------------------------------------------------------------------
# rollout: a transformers model standing in for vLLM


def fingerprint(tensors: dict[str, torch.Tensor]) -> list[float]:
    """Order-independent fingerprint of a state dict: sum and sum of squares (float64)."""
    s = sq = 0.0
    for t in tensors.values():
        t = t.detach().to(torch.float64)
        s += float(t.sum())
        sq += float((t * t).sum())
    return [s, sq]


class HFServer:
    """Ray actor: token-in/token-out sampling with a transformers causal LM."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.config = config
        self.replica_rank = replica_rank
        path = getattr(model_config, "local_path", None) or model_config.path
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.eos = set()
        for ids in (self.model.generation_config.eos_token_id, self.model.config.eos_token_id):
            if ids is not None:
                self.eos.update([ids] if isinstance(ids, int) else ids)
        self.max_tokens = int(config.response_length)
        self.global_steps: int | None = None
        self.lock = threading.Lock()
        self.counts: dict[tuple, int] = {}
        self.updates: list[dict] = []

    def get_address(self) -> str:
        return f"hf-server-{self.replica_rank}"

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], sampling_params: dict, request_id: str = "", **kwargs: Any
    ) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        temperature = float(sampling_params.get("temperature", 1.0))
        top_k = int(sampling_params.get("top_k", -1) or -1)
        max_tokens = int(sampling_params.get("max_tokens", self.max_tokens))
        key = (self.global_steps, tuple(prompt_ids))
        with self.lock:  # seeded per (weights version, prompt, k-th sample): reproducible
            k = self.counts.get(key, 0)
            self.counts[key] = k + 1
            gen = torch.Generator().manual_seed(
                hash((self.global_steps or 0, tuple(prompt_ids), k)) % (2**31)
            )
            ids = torch.tensor([list(prompt_ids)])
            out, lps = [], []
            past = None
            step_in = ids
            for _ in range(max_tokens):
                res = self.model(input_ids=step_in, past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[0, -1].float()
                if temperature <= 0:
                    tok = int(torch.argmax(logits))
                else:
                    scaled = logits / temperature
                    if top_k > 0:
                        kth = torch.topk(scaled, top_k).values[-1]
                        scaled = torch.where(scaled < kth, -torch.inf, scaled)
                    tok = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
                out.append(tok)
                lps.append(float(torch.log_softmax(logits, -1)[tok]))
                if tok in self.eos:
                    break
                step_in = torch.tensor([[tok]])
        want = sampling_params.get("logprobs")
        return TokenOutput(
            token_ids=out,
            log_probs=lps if want else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    def update_weights(self, state: dict[str, torch.Tensor], global_steps: Any = None) -> None:
        with self.lock:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise RuntimeError(f"hf rollout: unexpected weights {unexpected[:5]}")
            self.updates.append(
                {
                    "global_steps": global_steps,
                    "tensors": len(state),
                    "fingerprint": fingerprint(dict(self.model.state_dict())),
                }
            )
            if RECORD_DIR:
                with open(os.path.join(RECORD_DIR, f"server{self.replica_rank}.json"), "w") as f:
                    json.dump(self.updates, f)
                torch.save(state, os.path.join(RECORD_DIR, f"server{self.replica_rank}_last.pt"))

    def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    def get_updates(self) -> list[dict]:
        return self.updates

    # control methods verl calls on every rollout server
    def wake_up(self, *args: Any, **kwargs: Any) -> None: ...
    def sleep(self, *args: Any, **kwargs: Any) -> None: ...
    def clear_kv_cache(self, *args: Any, **kwargs: Any) -> None: ...
    def release_kv_cache(self, *args: Any, **kwargs: Any) -> None: ...
    def resume_kv_cache(self, *args: Any, **kwargs: Any) -> None: ...
    def abort_all_requests(self, *args: Any, **kwargs: Any) -> None: ...
    def resume_generation(self, *args: Any, **kwargs: Any) -> None: ...
    def start_profile(self, *args: Any, **kwargs: Any) -> None: ...
    def stop_profile(self, *args: Any, **kwargs: Any) -> None: ...


def server_name(replica_rank: int) -> str:
    return f"hf_server_{replica_rank}"


def _replica_class() -> type:
    import ray
    from verl.workers.rollout.replica import RolloutReplica

    class HFReplica(RolloutReplica):
        """``rollout.name=hf``: one :class:`HFServer` per replica (stands in for vLLM)."""

        async def launch_servers(self) -> None:
            server = (
                ray.remote(HFServer)
                .options(name=server_name(self.replica_rank), num_cpus=0, max_concurrency=4)
                .remote(self.config, self.model_config, self.replica_rank)
            )
            self.servers = [server]
            self._server_handle = server
            self._server_address = await server.get_address.remote()

    return HFReplica


def _register_rollout() -> None:
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("hf", _replica_class)
    base._ROLLOUT_REGISTRY[("hf", "async")] = "verl_cpu.HFServerAdapter"  # not a public API


after_import("verl.workers.rollout.replica", lambda m: _register_rollout())


class HFServerAdapter:
    """The actor worker's side of the hf rollout (stands in for vLLM's ``ServerAdapter``)."""

    def __init__(
        self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.config = config
        self.model_config = model_config
        rank = int(os.environ.get("RANK", 0))
        tp = int(getattr(config, "tensor_model_parallel_size", 1) or 1)
        self.replica_rank, self.rollout_rank = divmod(rank, tp)
        self.server = None

    def _server(self) -> Any:
        import ray

        if self.server is None:
            self.server = ray.get_actor(server_name(self.replica_rank))
        return self.server

    async def resume(self, tags: list[str]) -> None:
        pass

    async def release(self) -> None:
        pass

    async def update_weights(self, weights: Any, global_steps: Any = None, **kwargs: Any) -> None:
        from torch.distributed.tensor import DTensor

        state = {}
        for name, tensor in weights:  # every rank iterates: full_tensor() is a collective
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            state[name] = tensor.detach().to("cpu", torch.float32).clone()
        if self.rollout_rank == 0:
            server = self._server()
            await server.update_weights.remote(state, global_steps)
            if global_steps is not None:
                await server.set_global_steps.remote(global_steps)

    def generate_sequences(self, prompts: Any) -> Any:
        raise NotImplementedError("the hf rollout runs in server mode only")


# --------------------------------------------------------------------------------------------
# test instrumentation of the actor worker


_LOCAL = threading.local()
_STEP = {"optimizer_steps": 0, "faulted": 0}


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _append(name: str, record: dict) -> None:
    with open(os.path.join(RECORD_DIR, f"{name}{_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _record_policy_loss(fn: Any) -> Any:
    @functools.wraps(fn)
    def policy_loss(*, old_log_prob, log_prob, advantages, response_mask, **kwargs):
        train = torch.is_grad_enabled()
        data = getattr(_LOCAL, "data", None)
        if FAULT and train:
            rank, step = (int(x) for x in FAULT.split(":"))
            if rank == _rank() and _STEP["optimizer_steps"] + 1 == step and not _STEP["faulted"]:
                _STEP["faulted"] = 1  # one token of one response: the first micro-batch only
                old_log_prob = old_log_prob.clone()
                row = int(response_mask.any(-1).nonzero()[-1, 0])
                col = int(response_mask[row].nonzero()[0, 0])
                old_log_prob[row, col] = float("nan")
        loss, metrics = fn(
            old_log_prob=old_log_prob,
            log_prob=log_prob,
            advantages=advantages,
            response_mask=response_mask,
            **kwargs,
        )
        if RECORD_DIR:
            mask = response_mask.bool()
            rows = []
            for i in range(mask.shape[0]):
                m = mask[i]
                row = {
                    "adv": float(advantages[i][m][0]) if m.any() else 0.0,
                    "lp": log_prob[i][m].detach().float().tolist(),
                    "old": old_log_prob[i][m].detach().float().tolist(),
                }
                if data is not None:
                    row.update(data[i])
                rows.append(row)
            _append(
                "loss",
                {
                    "train": train,
                    "opt_step": _STEP["optimizer_steps"] + 1,
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "lp_dtype": str(log_prob.dtype),
                    "old_dtype": str(old_log_prob.dtype),
                    "rows": rows,
                },
            )
        return loss, metrics

    return policy_loss


def _losses(module: types.ModuleType) -> None:
    original = module.get_policy_loss_fn

    @functools.wraps(original)
    def get_policy_loss_fn(name: str) -> Any:
        fn = original(name)
        return _record_policy_loss(fn) if name == "disco" else fn

    module.get_policy_loss_fn = get_policy_loss_fn

    ppo_loss = module.ppo_loss

    @functools.wraps(ppo_loss)
    def recording_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None):
        if RECORD_DIR:
            prompts = data["prompts"] if "prompts" in data.keys() else None
            responses = data["responses"] if "responses" in data.keys() else None
            rows = []
            if responses is not None:
                resp = responses.unbind() if responses.is_nested else list(responses)
                prom = prompts.unbind() if prompts.is_nested else list(prompts)
                for p, r in zip(prom, resp, strict=True):
                    rows.append({"prompt": p.tolist(), "response": r.tolist()})
            _LOCAL.data = rows or None
        try:
            return ppo_loss(config, model_output, data, dp_group)
        finally:
            _LOCAL.data = None

    module.ppo_loss = recording_ppo_loss


def _engine(module: types.ModuleType) -> None:
    cls = module.FSDPEngine
    step = cls.optimizer_step

    @functools.wraps(step)
    def optimizer_step(self: Any) -> Any:
        from torch.distributed.tensor import DTensor

        _STEP["optimizer_steps"] += 1
        n = _STEP["optimizer_steps"]
        if RECORD_DIR:  # the step's full gradient, before clipping, and the parameters
            grads, params = {}, {}
            for name, p in self.module.named_parameters():
                t = p.data
                params[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
                g = p.grad
                if g is None:
                    continue
                grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu()
            if _rank() == 0:
                torch.save(grads, os.path.join(RECORD_DIR, f"grad_step{n}.pt"))
                torch.save(params, os.path.join(RECORD_DIR, f"params_step{n}.pt"))
        out = step(self)
        if RECORD_DIR:
            params = {}
            for name, p in self.module.named_parameters():
                t = p.data
                params[name] = t.full_tensor() if isinstance(t, DTensor) else t
            _append(
                "params",
                {"optimizer_step": n, "grad_norm": float(out), "fingerprint": fingerprint(params)},
            )
        return out

    cls.optimizer_step = optimizer_step


if RECORD_DIR or FAULT:
    after_import("verl.workers.utils.losses", _losses)
    after_import(
        "verl.workers.engine_workers",
        lambda m: setattr(m, "ppo_loss", sys.modules["verl.workers.utils.losses"].ppo_loss),
    )


def _planning(planning: types.ModuleType) -> None:
    finish = planning.finish

    @functools.wraps(finish)
    def recording_finish(plan: Any, *, group: Any = None) -> dict:
        metrics = finish(plan, group=group)
        _append("plan", {"opt_step": _STEP["optimizer_steps"], **metrics})
        return metrics

    planning.finish = recording_finish


if RECORD_DIR:
    after_import("verl.workers.engine.fsdp.transformer_impl", _engine)
    after_import("discoloss.adapters.verl.planning", _planning)

if os.environ.get("DISCO_E2E_RAISE_AT_ONCE"):
    # Measurement only: the adapter's behaviour before its one-rank fault handling (the loss
    # raises at once on the rank that meets the bad value).
    import discoloss.adapters.verl.faults as _faults

    _faults.is_deferring = lambda: False
