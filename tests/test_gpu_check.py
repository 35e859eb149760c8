"""benchmarks/gpu_check.py on CPU: a subset of its table that covers every script, amp, DALI from image folders and
from RecordIO, faiss and torchrun; the one line without a GPU; a failing and a timed-out path.

The whole CPU table (27 runs, 5 to 6 minutes on 2 cores) is too slow for the suite: one row per script here."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, script_env

SUBSET = ["selftuning amp bf16", "debiaspl dali folder", "metric_transfer faiss knn graph", "usl amp fp16",
          "usl_t torchrun x2 gloo", "metasemi dali recordio"]


def gpu_check(*args, tmp_path=None, timeout=400):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *map(str, args)], cwd=REPO,
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def table(stdout):
    """The rows of the printed table as dicts keyed by the header."""
    lines = [l for l in stdout.splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split(" | ")))) for l in lines[1:]]


def exact(*names):
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def test_cpu_subset_every_row_passes(tmp_path):
    proc = gpu_check("--cpu", "--only", exact(*SUBSET), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = table(proc.stdout)
    assert [f"{r['script']} {r['path']}" for r in rows] == SUBSET
    for r in rows:
        assert r["result"] == "PASS", r
        value, unit = r["rate"].split()
        assert float(value) > 0 and unit == ("img/s" if r["script"] == "usl" else "it/s"), r
        assert 100 < float(r["peak RSS MiB"]) < 20000, r  # a real resident set, in MiB
    assert f"{len(SUBSET)} of {len(SUBSET)} paths passed" in proc.stdout


def test_the_cpu_table_lists_every_path_of_every_script():
    proc = gpu_check("--cpu", "--list")
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split("\n")[:-1]
    scripts = ["selftuning", "debiaspl", "metric_transfer", "usl", "usl_t", "metasemi"]
    for s in scripts:
        assert {f"{s} amp bf16", f"{s} amp fp16", f"{s} torchrun x2 gloo"} <= set(names), s
    assert {n for n in names if "dali" in n} == {"debiaspl dali folder", "metric_transfer dali folder",
                                                 "usl dali folder", "metasemi dali folder", "metasemi dali recordio"}
    assert {n for n in names if "faiss" in n} == {"metric_transfer faiss knn graph", "usl faiss knn+kmeans",
                                                  "usl_t faiss knn"}
    assert [n for n in names if "compile" in n] == ["usl_t compile"]
    assert len(names) == 27 and set(SUBSET) <= set(names)


def test_without_a_gpu_and_without_cpu_one_line_and_exit_0():
    proc = gpu_check()  # script_env hides CUDA: CUDA_VISIBLE_DEVICES=""
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA device" in proc.stdout and "--cpu" in proc.stdout


def test_a_failing_path_is_fail_with_its_first_error_line_and_exit_1(tmp_path):
    proc = gpu_check("--cpu", "--only", "^usl faiss", "--extra=--no_such_flag", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    (row,) = table(proc.stdout)
    assert row["result"] == "FAIL: error: unrecognized arguments: --no_such_flag (see --help)", row
    assert "0 of 1 paths passed" in proc.stdout
    assert re.search(r"^failed: usl faiss knn\+kmeans: .*usl\.py .*--no_such_flag$", proc.stdout, re.M)


def test_a_run_over_its_timeout_fails_and_leaves_no_process(tmp_path):
    keep = tmp_path / "kept"
    proc = gpu_check("--cpu", "--only", "^usl_t torchrun", "--timeout", 2, "--keep", keep, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    (row,) = table(proc.stdout)
    assert row["result"] == "FAIL: timed out after 2 s", row
    # torchrun and both ranks were ended: no process runs with the kept folder on its command line
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(keep).encode() in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert not left
    assert (keep / "logs" / "usl-t-torchrun-x2-gloo.err").exists()  # --keep keeps the logs


def test_the_cuda_table_on_a_machine_that_only_claims_a_gpu(monkeypatch, capsys):
    # The CUDA code path of the check itself (rows, --device cuda, the GPU memory column), in process: torch says
    # one GPU is there, the runs see none and fail with the scripts' own one-line error.
    import torch
    if torch.cuda.is_available():
        pytest.skip("a real GPU: the check itself runs there")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(["--list"]) == 0
    names = capsys.readouterr().out.split("\n")[:-1]
    assert len(names) == 28 and "debiaspl compile" in names and "usl_t compile" in names
    assert "metasemi torchrun x1 (one GPU: no NCCL)" in names
    assert gpu_check.main(["--only", "^usl faiss"]) == 1
    out = capsys.readouterr().out
    (row,) = table(out)
    assert "peak GPU MiB" in row and "--device cuda" in out
    assert row["result"] == "FAIL: error: --device cuda was asked for but no CUDA device is visible; use --device cpu"
