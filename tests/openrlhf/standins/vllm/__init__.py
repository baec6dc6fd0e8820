"""Stand-in for vLLM (GPU-only). Imported at module level by openrlhf.trainer.ray.vllm_engine and
openrlhf.trainer.ppo_utils.samples_generator; the tests never generate with it."""

__version__ = "0.0.0+standin"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
