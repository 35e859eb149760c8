"""Thread pools on a shared machine: idle OpenMP threads sleep, and k-means' small-op loop runs on one thread."""
import ast
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import usl
from conftest import REPO

SCRIPTS = ["selftuning.py", "debiaspl.py", "metric_transfer.py", "usl.py", "usl_t.py", "metasemi.py"]


def imports_in_order(body):
    """Top-level module names imported by the statements of `body`, in order."""
    names = []
    for node in body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", SCRIPTS + ["benchmarks/selection.py", "benchmarks/propagation.py"])
def test_common_is_imported_before_torch_and_faiss(script):
    # the wait policy is read once, when torch's (or faiss's) OpenMP runtime loads; a benchmark's measurement
    # runs in its `child` function
    tree = ast.parse((REPO / script).read_text())
    if script.startswith("benchmarks/"):
        tree = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "child")
    names = imports_in_order(tree.body)
    heavy = [i for i, n in enumerate(names) if n in ("torch", "torchvision", "faiss", "usl", "metric_transfer")]
    assert "common" in names and names.index("common") < min(heavy), names


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_common_makes_idle_threads_sleep_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", "import common, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


def test_kmeans_pruned_search_runs_on_one_thread_and_restores_the_pool(monkeypatch):
    monkeypatch.setattr(usl, "GROUP_COST", 0)  # the search is chosen on these few points
    seen = []
    inner = usl._nearest_two_pruned

    def spy(*args):
        seen.append(torch.get_num_threads())
        return inner(*args)
    monkeypatch.setattr(usl, "_nearest_two_pruned", spy)
    rng = np.random.RandomState(0)
    x = (rng.randn(1500, 4) + rng.randint(0, 6, (1500, 1))).astype(np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        usl.kmeans(x, 80, 5)  # > 64 clusters: rounds after the first use the pruned search
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert after == 2


def test_busy_cores_spins_while_the_block_runs_and_never_outlives_it():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from busy import busy_cores
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with busy_cores(1) as procs:
        time.sleep(1.0)
        assert procs[0].poll() is None
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert procs[0].poll() is not None
    assert after.ru_utime - before.ru_utime > 0.1  # it really spun (a sleeping process takes ~0.02 s)
    with busy_cores(1, seconds=0.5) as procs:  # the deadline ends it even if the block does not
        deadline = time.time() + 30
        while procs[0].poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert procs[0].returncode == 0
