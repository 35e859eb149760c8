"""Shared test helpers: run a script through its command line, offline, on CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def script_env(tmp_path=None, **extra):
    """Environment of a test run: CPU only, one thread per process, no network-backed caches outside tmp."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               PYTHONPATH=str(REPO))
    if tmp_path is not None:
        env["TORCH_HOME"] = str(Path(tmp_path) / "torch_home")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script, *args, cwd=None, env=None, timeout=600, torchrun=0):
    """Run `python <script> args...` (or torchrun with `torchrun` processes) and return the CompletedProcess."""
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd += [str(REPO / script), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env or script_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_user_error(proc, *fragments):
    """A bad input: non-zero exit, one `error:` line on stderr naming what is wrong, and no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def env(tmp_path):
    return script_env(tmp_path)


@pytest.fixture
def one_thread():
    """In-process runs: one thread like the subprocesses, and the global deterministic switch restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
