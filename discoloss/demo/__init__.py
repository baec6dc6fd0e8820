"""``discoloss demo``: DisCO next to GRPO, Dr. GRPO and DAPO, end to end on one CPU.

A tiny causal language model (built from a config, random weights, own character tokenizer)
learns multi-digit addition: a supervised warm-up to an imperfect accuracy, then RL from a
binary verifier with each loss, from the same checkpoint, with the same budget and seeds.

Modules: :mod:`~discoloss.demo.task` (data, tokenizer, verifier), :mod:`~discoloss.demo.model`
(model, packing, log-probs, sampling), :mod:`~discoloss.demo.train` (warm-up, RL loop,
evaluation), :mod:`~discoloss.demo.report` (table, plots, JSON), :mod:`~discoloss.demo.cli`
(the command), :mod:`~discoloss.demo.sweep` (learning-rate sweep) and
:mod:`~discoloss.demo.workers` (worker processes, progress bars and CPU time, shared by the
last two).
Needs the ``demo`` extra (transformers, matplotlib, tqdm), imported only here.
"""
