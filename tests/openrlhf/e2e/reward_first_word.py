"""Reward function for ``--reward.remote_url`` (a ``.py`` file: OpenRLHF's
``SingleTurnAgentExecutor`` loads ``reward_func`` from it): 1 if the response's first word is one
of the label's words, else 0. With a random tiny model about half of the responses are positive."""


def reward_func(queries, prompts, labels):
    query, prompt, label = queries[0], prompts[0], labels[0]
    words = query[len(prompt):].split()
    reward = float(bool(words) and words[0] in label.split())
    return {"rewards": reward, "scores": reward, "extra_logs": {}}
