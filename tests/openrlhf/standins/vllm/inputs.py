"""Stand-in for vllm.inputs."""


class TokensPrompt(dict):
    pass
