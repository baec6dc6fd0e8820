"""The policy: a tiny Llama-style causal LM built from a config, plus packing and sampling.

Sequence layout (one row per response)::

    [<pad> ... <pad>] [<bos> a + b =] [response tokens] [<pad> ...]
     left padding      prompt           sampled answer    right padding

Position ids count real tokens only (``cumsum(attention_mask) - 1``), so a token has the
same position whatever the padding, in sampling and in training alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from discoloss.demo.task import BOS, EOS, PAD, VOCAB, TaskConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "ModelConfig",
    "Packed",
    "build_model",
    "generate",
    "pack",
    "response_log_probs",
    "trim_response",
]


@dataclass(frozen=True)
class ModelConfig:
    """Size of the Llama-style policy (264k parameters at the defaults)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    ffn: int = 256

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_model(config: ModelConfig, task: TaskConfig, *, seed: int) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM`` (tied embeddings), in float32, train mode.

    The initialisation depends on ``seed`` only (the global RNG state is restored afterwards).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=config.hidden,
        intermediate_size=config.ffn,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=task.max_prompt_tokens + task.max_answer_tokens + 1,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    model.float()
    model.train()
    return model


class Packed(NamedTuple):
    """A packed batch of prompt + response rows.

    input_ids, attention_mask, position_ids: (B, L) int64.
    response_mask: (B, L-1) bool, True where the *target* ``input_ids[:, t+1]`` is a response
      token (aligned with :func:`response_log_probs`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> Packed:
    """Left-pad the prompts, right-pad the responses, into one (B, P + R) batch."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts and responses must have the same length, got {len(prompts)} and "
            f"{len(responses)}"
        )
    b = len(prompts)
    p_len = max(len(p) for p in prompts)
    r_len = max(max((len(r) for r in responses), default=0), 1)
    ids = torch.full((b, p_len + r_len), PAD, dtype=torch.long)
    attn = torch.zeros((b, p_len + r_len), dtype=torch.long)
    resp = torch.zeros((b, p_len + r_len), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len + len(r)] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(list(r), dtype=torch.long)
            resp[i, p_len : p_len + len(r)] = True
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return Packed(ids, attn, pos, resp[:, 1:])


def response_log_probs(model: Any, batch: Packed) -> tuple[Tensor, Tensor]:
    """Token log-probs of the targets and the policy entropy at each position.

    Returns (log_probs, entropy), both (B, L-1) float32: ``log_probs[:, t] = log pi(x_{t+1} |
    x_{<=t})`` and ``entropy[:, t] = H(pi(. | x_{<=t}))``. Meaningful where
    ``batch.response_mask`` is True. Differentiable (call under ``torch.no_grad()`` for the
    sampling policy's log-probs).
    """
    logits = (
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    log_probs = logp_all.gather(-1, targets).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return log_probs, entropy


def trim_response(tokens: Sequence[int]) -> list[int]:
    """The response proper: tokens up to and including the first ``<eos>`` (all if none)."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t == EOS:
            break
    return out


def _cache_name(model: Any) -> str:
    """The KV-cache keyword of ``model.forward`` (and field of its output).

    transformers >= 5.24 names it ``cache`` (``past_key_values`` is deprecated there and goes
    in 5.40); older releases only know ``past_key_values``.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
    with_log_probs: bool = False,
) -> Any:
    """Sample (``temperature > 0``) or decode greedily (``temperature == 0``) with a KV cache.

    Returns one response per prompt, trimmed after the first ``<eos>`` (responses that hit
    ``max_new_tokens`` have no ``<eos>``). Deterministic given ``generator``'s state.
    ``with_log_probs=True`` returns ``(responses, log_probs)`` instead, ``log_probs[i][t]``
    being the log-probability of ``responses[i][t]`` under the distribution it was drawn from
    (softmax of logits / temperature; the argmax's log-probability at temperature 1 for greedy
    decoding): what a training forward pass of the same tokens must reproduce at theta_old.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cache_name = _cache_name(model)
    was_training = model.training
    model.eval()
    try:
        b = len(prompts)
        p_len = max(len(p) for p in prompts)
        ids = torch.full((b, p_len), PAD, dtype=torch.long)
        attn = torch.zeros((b, p_len), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, p_len - len(p) :] = 1
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        cache = getattr(out, cache_name)
        logits = out.logits[:, -1].float()
        done = torch.zeros(b, dtype=torch.bool)
        steps: list[Tensor] = []
        step_lp: list[Tensor] = []
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
                logp = torch.log_softmax(logits, dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                logp = torch.log_softmax(logits / temperature, dim=-1)
            step_lp.append(logp.gather(1, nxt[:, None]).squeeze(1))
            nxt = torch.where(done, PAD, nxt)
            steps.append(nxt)
            done = done | (nxt == EOS)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((b, 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=attn,
                position_ids=pos,
                use_cache=True,
                **{cache_name: cache},
            )
            cache = getattr(out, cache_name)
            logits = out.logits[:, -1].float()
        tokens = torch.stack(steps, dim=1).tolist()
        responses = [trim_response(t) for t in tokens]
        if not with_log_probs:
            return responses
        lps = torch.stack(step_lp, dim=1).tolist()
        return responses, [lp[: len(r)] for lp, r in zip(lps, responses)]
    finally:
        model.train(was_training)
