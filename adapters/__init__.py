"""Engine adapters for discoloss (verl, OpenRLHF, TRL).

The core package never imports these modules; each adapter imports its engine only when used.
"""
