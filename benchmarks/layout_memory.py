"""On paper: tokens and activation memory of one training micro-batch, whole questions vs one
response per micro-batch, for the paper's models at long chain-of-thought lengths.

A micro-batch that must hold whole questions holds ``n`` responses; with the any-layout modes
(``weights=current`` or ``sampling``) it may hold one, like GRPO's smallest micro-batch. What the
micro-batch size decides on a GPU is the activation memory of its forward and backward pass
(parameters, gradients and optimizer state do not depend on it). The model, per token of the
micro-batch, bfloat16 activations (2 bytes), flash attention (no attention matrix), no tensor or
sequence parallelism, full activation checkpointing (what long-response RL runs use):

* **checkpoints**: every decoder layer's input is kept for the backward pass: ``L * h * 2``
  bytes per token;
* **recompute**: during the backward pass one layer at a time is recomputed with all the
  tensors its backward needs: its input and the two RMSNorm outputs and residual (``4h``), the
  rotated q and k and v (``h + 2 h_kv``), the attention output (``h``), and in the SwiGLU MLP
  the gate, up, silu(gate) and product (``4I``): ``(6h + 2h_kv + 4I) * 2`` bytes per token;
* **logits**: the LM head's output, ``V * 2`` bytes per token (bfloat16, with the log-softmax
  computed by a fused kernel without a float32 copy; an unfused float32 log-softmax adds
  ``V * 4``).

Not counted: prompt tokens (they add their share), the transient gradient tensors of the layer
being back-propagated, allocator fragmentation. Sequence parallelism (e.g. Ulysses) divides all
three terms by its degree. These are estimates to compare layouts, not a profile.

    python -m benchmarks.layout_memory          # the markdown table of benchmarks/RESULTS.md
"""

from __future__ import annotations

from typing import NamedTuple

GIB = 1024**3
BF16 = 2


class ModelShape(NamedTuple):
    """Decoder shape (from the models' public configuration files)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int  # key/value heads * head dimension
    vocab: int


#: The DisCO paper's models: DeepSeek-R1-Distill-Qwen-1.5B and -7B (Qwen2 architecture).
MODELS = (
    ModelShape("1.5B", layers=28, hidden=1536, intermediate=8960, kv_hidden=2 * 128, vocab=151936),
    ModelShape("7B", layers=28, hidden=3584, intermediate=18944, kv_hidden=4 * 128, vocab=152064),
)


class MicroBatchMemory(NamedTuple):
    """Bytes of one micro-batch's activations, by term (see the module docstring)."""

    tokens: int
    checkpoints: int
    recompute: int
    logits: int

    @property
    def total(self) -> int:
        return self.checkpoints + self.recompute + self.logits


def micro_batch_memory(model: ModelShape, tokens: int) -> MicroBatchMemory:
    h, kv, inter = model.hidden, model.kv_hidden, model.intermediate
    return MicroBatchMemory(
        tokens=tokens,
        checkpoints=tokens * model.layers * h * BF16,
        recompute=tokens * (6 * h + 2 * kv + 4 * inter) * BF16,
        logits=tokens * model.vocab * BF16,
    )


def table() -> str:
    """Markdown: per model, response length and group size, both layouts."""
    lines = [
        "| model | response tokens | n | layout | tokens / micro-batch | checkpoints GiB "
        "| recompute GiB | logits GiB | total GiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        for length in (8 * 1024, 32 * 1024):
            for n in (8, 16):
                for layout, responses in (("whole questions", n), ("one response", 1)):
                    m = micro_batch_memory(model, responses * length)
                    lines.append(
                        f"| {model.name} | {length // 1024}k | {n} | {layout} | {m.tokens:,} | "
                        f"{m.checkpoints / GIB:.1f} | {m.recompute / GIB:.1f} | "
                        f"{m.logits / GIB:.1f} | {m.total / GIB:.1f} |"
                    )
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
