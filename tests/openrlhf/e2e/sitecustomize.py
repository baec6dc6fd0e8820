"""Installs the CPU stand-ins of :mod:`orlhf_cpu` in every Python process of an end-to-end run
(the launcher's driver and every Ray worker), only when ``DISCOLOSS_OPENRLHF_CPU=1``.

Test-only: this folder is put on ``PYTHONPATH`` by tests/openrlhf/test_openrlhf_e2e.py alone.
Ray workers inherit the driver's environment, so Python runs this file in each of them before
Ray's own worker setup hook (the adapter's) runs.
"""

import os

if os.environ.get("DISCOLOSS_OPENRLHF_CPU") == "1":
    import orlhf_cpu

    orlhf_cpu.install()
