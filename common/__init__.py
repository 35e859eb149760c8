"""Shared plumbing of the method scripts: datasets, backbones, DALI loading, distributed setup, run folders.

Method math never lives here: each script owns its own, so one file can be copied as a baseline.

Every script imports this package before torch, so that idle OpenMP threads sleep instead of spinning: torch and
faiss each bring an OpenMP runtime whose threads otherwise spin after every parallel region, and when another
process holds a core the spinners take the time the working threads need (README, "On a shared machine";
`benchmarks/wait_policy.py`, `benchmarks/selection.py --busy 1`). The variable counts only if set before torch or
faiss loads; a value the user set is kept (`OMP_WAIT_POLICY=ACTIVE` brings the spinning back).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class UserError(Exception):
    """Bad input. ``str(e)`` is one line saying what is wrong and what to do; ``common.run.entry`` prints it and exits 2."""
