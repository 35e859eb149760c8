"""Load on the machine while a measurement runs: what a job meets on a shared node.

    with busy_cores(1):
        measure()
"""
import contextlib
import subprocess
import sys


@contextlib.contextmanager
def busy_cores(n, seconds=3600):
    """`n` background processes, each spinning on one core until the block ends, or after `seconds` at the latest
    (a benchmark that crashes leaves no spinner behind)."""
    loop = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
