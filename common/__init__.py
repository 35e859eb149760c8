"""Shared plumbing of the method scripts: datasets, backbones, DALI loading, distributed setup, run folders.

Method math never lives here: each script owns its own, so one file can be copied as a baseline.
"""


class UserError(Exception):
    """Bad input. ``str(e)`` is one line saying what is wrong and what to do; ``common.run.entry`` prints it and exits 2."""
