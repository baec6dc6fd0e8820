"""Benchmarks of discoloss against the published DisCO loss and GRPO.

python -m benchmarks.run --help
"""
