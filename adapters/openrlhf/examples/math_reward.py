"""Binary math reward for OpenRLHF's ``--reward.remote_url <this file>``.

OpenRLHF loads ``reward_func(queries, prompts, labels)`` from a ``.py`` path and calls it per
response. The reward is 1.0 when the last ``\\boxed{...}`` of the response equals the label
(after light normalisation), else 0.0: the binary verifiable reward DisCO is built for
(positive iff reward > --algo.disco.threshold, default 0.5).
"""

from __future__ import annotations

import re

import torch


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    out = []
    while i < len(text) and depth:
        ch = text[i]
        depth += ch == "{"
        depth -= ch == "}"
        if depth:
            out.append(ch)
        i += 1
    return "".join(out) if depth == 0 else None


def normalise(answer: str) -> str:
    answer = re.sub(r"\\(left|right|,|!|;|:)", "", answer)
    answer = answer.replace("$", "").replace(" ", "").rstrip(".")
    if answer.startswith("\\text{"):
        return answer.removeprefix("\\text{").removesuffix("}")
    return answer


def reward_func(queries: list[str], prompts: list[str], labels: list[str]) -> dict:
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt):] if query.startswith(prompt) else query
        got = last_boxed(response)
        rewards.append(float(got is not None and normalise(got) == normalise(str(label))))
    r = torch.tensor(rewards)
    return {"rewards": r, "scores": r, "extra_logs": {"accuracy": r}}
