"""run.sh: every command it would launch names an existing script and parses with that script's flags, and the
runner skips, resumes, records failures, filters, reseeds and queues rows over GPUs. The runner tests put a stand-in
`python` and `torchrun` first in PATH: it records its argv and acts out a run (writes the run folder's files, fails or
hangs on request) without training."""
import collections
import importlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

RUN_SH = str(REPO / "run.sh")


# The cpu suite adds its CIFAR-10 rows when CIFAR10_ROOT is set; the path need not exist to list them.
WITH_CIFAR = {"CIFAR10_ROOT": "data/cifar10"}


def listed(*args, env=None):
    """(run folder, argv) of every row `run.sh --list ARGS` prints, with `env` added to the environment."""
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_ROOT"} | (env or {})
    out = subprocess.run(["bash", RUN_SH, "--list", *args], capture_output=True, text=True, check=True,
                         env=env).stdout
    return [(folder, shlex.split(cmd)) for folder, cmd in (line.split("\t", 1) for line in out.splitlines())]


def listed_commands(*args, env=None):
    return [cmd for _, cmd in listed(*args, env=env)]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_list_covers_every_method_and_rejects_unknown_names():
    scripts = {next(a for a in cmd if a.endswith(".py")) for cmd in listed_commands()}
    assert scripts == {"selftuning.py", "debiaspl.py", "metric_transfer.py", "usl.py", "usl_t.py", "metasemi.py"}
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "fixmatch"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method 'fixmatch'")


@pytest.mark.parametrize("cmd", listed_commands() + listed_commands("cpu", env=WITH_CIFAR),
                         ids=lambda cmd: " ".join(cmd[:4]))
def test_every_command_parses(cmd):
    assert cmd[0] in ("python", "torchrun"), cmd
    at = next(i for i, a in enumerate(cmd) if a.endswith(".py"))
    if cmd[0] == "torchrun":
        assert cmd[1:at] in (["--nproc_per_node", n] for n in ("2", "4", "8")), cmd
    module = importlib.import_module(cmd[at][:-3])
    try:
        module.parse_args(cmd[at + 1:])
    except SystemExit as exit_:  # argparse: an unknown flag or a bad value
        pytest.fail(f"{' '.join(cmd)} does not parse (exit {exit_.code})")


@pytest.mark.parametrize("seeds", [None, "1 2"])
def test_every_row_has_its_own_run_folder(seeds):
    rows = listed("metric_transfer", "usl", "selftuning", "debiaspl", "metasemi", "cpu",
                  *(["--seeds", seeds] if seeds else []), env=WITH_CIFAR)
    by_folder = collections.defaultdict(list)
    made = set()
    for folder, cmd in rows:
        assert flag(cmd, "--logdir") == "runs" and folder == f"runs/{flag(cmd, '--run_name')}", cmd
        by_folder[folder].append(cmd)
        # a folder another row reads from is made by an earlier row (the runner waits for it)
        for word in cmd:
            if word.startswith("runs/") and word.count("/") > 1 and "-cache" not in word:
                assert "/".join(word.split("/")[:2]) in made, (word, cmd)
        made.add(folder)
    for folder, cmds in by_folder.items():
        # only metric_transfer's stages share a folder, one row per stage and propagation
        if len(cmds) > 1:
            steps = [(flag(c, "--stage"), flag(c, "--propagation")) for c in cmds]
            assert all("metric_transfer.py" in c for c in cmds) and len(set(steps)) == len(steps), cmds


def test_paper_seeds_and_names():
    rows = listed()
    names = {folder[len("runs/"):] for folder, _ in rows}
    # the names the commands had are kept for the paper's seed
    assert {"debiaspl-imagenet-0.2p", "debiaspl-imagenet-zsl", "mt-cifar10-pretrain", "mt-cifar10-250",
            "mt-imagenet-1p", "usl-imagenet-moco-0.2p", "fixmatch-usl-cifar10-40-s1", "fixmatch-uslt-cifar10-40",
            "fixmatch-usl-clip-imagenet-0.2p", "metasemi-cifar10-4000-nomixup", "metasemi-cifar10-4000-jvp"} <= names
    seeds = collections.defaultdict(set)
    for _, cmd in rows:
        script = next(a for a in cmd if a.endswith(".py"))
        seeds[script, flag(cmd, "--dataset"), flag(cmd, "--num_labeled") or flag(cmd, "--budget"),
              flag(cmd, "--selection")].add(flag(cmd, "--seed"))
    assert seeds["debiaspl.py", "cifar10", "40", None] == {"0", "1", "2"}  # FixMatch protocol: three splits
    assert seeds["usl.py", "cifar10", "250", None] == {"1", "2", "3", "4", "5"}  # USL's k-means seeds
    assert seeds["usl.py", "cifar100", "400", None] == {"1", "2", "3", "4", "5"}
    assert seeds["usl.py", "cifar10", "40", "random"] == {"1", "2", "5"}
    assert seeds["usl_t.py", "cifar10", "40", None] == {"42"}
    assert seeds["selftuning.py", None, None, None] == {"666666"}
    assert seeds["metasemi.py", "cifar10", "4000", None] == {"8469"}  # the paper's ablations included
    assert seeds["metasemi.py", "svhn", "1000", None] == {"7788"}


def test_cpu_suite_compares_each_method_with_its_base_over_seeds():
    digits = listed("cpu")
    both = listed("cpu", env=WITH_CIFAR)
    assert {flag(c, "--dataset") for _, c in digits} == {"digits"}
    assert {flag(c, "--dataset") for _, c in both} == {"digits", "cifar10"} and both[:len(digits)] == digits
    assert all(flag(c, "--root") == "data/cifar10" for _, c in both[len(digits):])
    for _, cmd in both:
        assert flag(cmd, "--seed") is not None and flag(cmd, "--device") == "cpu", cmd
    names = {folder[len("runs/"):] for folder, _ in both}
    for d, n in (("digits", 50), ("cifar10", 250)):
        for prefix in ("debiaspl", "fixmatch", "debiaspl-labeled-only", "selftuning", "selftuning-ft", "metasemi",
                       "metasemi-nometa", "metasemi-labeled-only"):
            assert {f"cpu-{prefix}-{d}-{n}-s{s}" for s in (0, 1, 2)} <= names, (prefix, d)
    # the selection baselines and the runs trained on them
    for sel in ("usl-digits-10", "usl_t-digits-10", "usl-digits-10-random"):
        assert {f"cpu-{sel}-s{s}" for s in (0, 1, 2)} | {f"cpu-fixmatch-{sel}-s{s}" for s in (0, 1, 2)} <= names
    rows = listed("cpu", "--seeds", "5")
    assert {flag(c, "--seed") for _, c in rows} == {"0", "5"}  # the shared backbone keeps its seed
    assert [f for f, c in rows if flag(c, "--seed") == "0"] == ["runs/cpu-mt-digits-pretrain"]


def test_seeds_override_every_row():
    one = listed("--seeds", "7")
    two = listed("--seeds", "3 4")
    assert len(two) == 2 * len(one)
    for folder, cmd in one:
        assert folder.endswith("-s7"), folder
        assert flag(cmd, "--seed") in ("7", None), cmd
        if flag(cmd, "--seed") is None:  # FixMatch on a selection: the seed is the selection's
            assert flag(cmd, "--trainindex_x").split("/")[1].endswith("-s7"), cmd
    assert {folder.rsplit("-", 1)[1] for folder, _ in two} == {"s3", "s4"}


def test_only_keeps_the_rows_whose_command_or_name_matches():
    every = listed()
    for regex in ("wrn28_8", "^usl_t-", "torchrun --nproc_per_node 2 "):
        rows = listed("--only", regex)
        expect = [(f, c) for f, c in every if re.search(regex, shlex.join(c)) or re.search(regex, f[len("runs/"):])]
        assert rows == expect and rows, regex


# ------------------------------------------------------------------------------------------------ the runner
STANDIN = r'''#!{python}
"""Stand-in for python and torchrun: records its argv and acts out a run without training."""
import json, os, re, sys, time
from pathlib import Path

argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1] if name in argv else None
name = flag("--run_name")
folder = Path(flag("--logdir")) / name
record = dict(prog=Path(sys.argv[0]).name, exe=sys.argv[0], argv=argv, name=name,
              cuda=os.environ.get("CUDA_VISIBLE_DEVICES"), pid=os.getpid())
asked = lambda var: bool(os.environ.get(var)) and re.search(os.environ[var], name) is not None


def log(event):
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(json.dumps(dict(record, event=event, t=time.time())) + "\n")


log("start")
print(f"stand-in stdout of {{name}}", flush=True)
print(f"stand-in warning of {{name}}", file=sys.stderr, flush=True)
folder.mkdir(parents=True, exist_ok=True)
if asked("STANDIN_HANG"):  # a long run: a checkpoint, then training until killed
    (folder / "checkpoint.pt").write_text("")
    time.sleep(120)
time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
if asked("STANDIN_FAIL"):
    print(f"error: stand-in failure of {{name}}", file=sys.stderr, flush=True)
    print("stdout after the error", flush=True)
    log("end")
    sys.exit(1)
stage = flag("--stage")  # metric_transfer: each stage leaves its product, and summary.json the figures so far
if stage == "pretrain":
    (folder / "pretrain.pt").write_text("")
if stage == "propagate":
    (folder / f"propagation_{{flag('--propagation')}}.json").write_text("{{}}")
summary = folder / "summary.json"
old = json.loads(summary.read_text()) if summary.exists() else {{}}
top1 = None if stage in ("pretrain", "propagate") else 50.0
summary.write_text(json.dumps({{"final_top1": old.get("final_top1") or top1}}, indent=2))
log("end")
'''


def standins(bin_dir):
    bin_dir.mkdir(parents=True)
    for prog in ("python", "torchrun"):
        (bin_dir / prog).write_text(STANDIN.format(python=sys.executable))
        (bin_dir / prog).chmod(0o755)


@pytest.fixture
def runner(tmp_path):
    """run(*args, **env) -> CompletedProcess of run.sh with the stand-ins first in PATH; records() -> what they did."""
    bin_dir = tmp_path / "bin"
    standins(bin_dir)
    runs = tmp_path / "runs"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUN_SH_VENV="", RUNS=str(runs),
               STANDIN_LOG=str(tmp_path / "calls.jsonl"))

    class Runner:
        def __init__(self):
            self.runs = runs

        def start(self, *args, **extra):
            return subprocess.Popen(["bash", RUN_SH, *args], env=dict(env, **extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    preexec_fn=default_sigint)

        def run(self, *args, **extra):
            proc = self.start(*args, **extra)
            out, err = proc.communicate(timeout=120)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

        def records(self, event="start"):
            path = tmp_path / "calls.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            return [r for r in map(json.loads, lines) if event is None or r["event"] == event]

        def names(self):
            return [r["name"] for r in self.records()]

        def clear(self):
            (tmp_path / "calls.jsonl").unlink(missing_ok=True)

        def log(self):
            return (runs / "run.sh.log").read_text()

    return Runner()


@pytest.mark.parametrize("args", [["fixmatch"], ["--bogus"], ["--gpus", "a,b"], ["--gpus", "0,0"], ["--gpus", ""],
                                  ["--seeds", "x"], ["--seeds", ""], ["--only"], ["--only", "("],
                                  ["--only", "no-row-is-called-this"]])
def test_bad_arguments_are_one_error_line_and_exit_2(runner, args):
    proc = runner.run("--dry-run", *args)  # --dry-run and the stand-ins: nothing runs even if a check is missing
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, \
        (args, proc.stderr)


CIFAR40 = ["debiaspl", "--only", "^debiaspl-cifar10-40-s"]  # three rows: seeds 0, 1, 2
def default_sigint():
    # A shell that starts with SIGINT ignored cannot trap it, and a child inherits "ignored" from its parent (the
    # test process may have it so, after other tests): the runner starts as from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


CIFAR = ["debiaspl", "--only", "^debiaspl-cifar10-"]  # six rows: 40 and 250 labels, seeds 0, 1, 2


def finished(runner, name):
    (runner.runs / name).mkdir(parents=True, exist_ok=True)
    (runner.runs / name / "summary.json").write_text('{"final_top1": 90.0}')


def checkpointed(runner, name):
    (runner.runs / name).mkdir(parents=True, exist_ok=True)
    (runner.runs / name / "checkpoint.pt").write_text("")


def test_skip_resume_and_a_failure_that_does_not_stop_the_others(runner):
    finished(runner, "debiaspl-cifar10-40-s0")
    checkpointed(runner, "debiaspl-cifar10-40-s1")
    proc = runner.run(*CIFAR, STANDIN_FAIL="^debiaspl-cifar10-40-s2$")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the finished row is skipped; every other row runs, in order, once
    assert runner.names() == ["debiaspl-cifar10-40-s1", "debiaspl-cifar10-40-s2", "debiaspl-cifar10-250-s0",
                              "debiaspl-cifar10-250-s1", "debiaspl-cifar10-250-s2"]
    commands = {flag(c, "--run_name"): c for c in listed_commands(*CIFAR)}
    for r in runner.records():
        assert r["prog"] == "python" and r["argv"][:1] == ["debiaspl.py"]
        assert flag(r["argv"], "--logdir") == str(runner.runs)
        resume = ["--resume", "auto"] if r["name"] == "debiaspl-cifar10-40-s1" else []
        listed_argv = [str(runner.runs) if a == "runs" else a for a in commands[r["name"]][1:]]
        assert r["argv"] == listed_argv + resume  # the listed command, plus --resume auto with a checkpoint
    for s in ("40-s1", "250-s0", "250-s1", "250-s2"):
        assert (runner.runs / f"debiaspl-cifar10-{s}" / "summary.json").exists()
    # the failure: row, exit code and the last error line of its stderr (not its later stdout)
    failed = [line for line in runner.log().splitlines() if " failed " in line]
    assert len(failed) == 1 and "debiaspl-cifar10-40-s2" in failed[0] and "exit 1" in failed[0], failed
    assert "error: stand-in failure of debiaspl-cifar10-40-s2" in failed[0] and "stdout after" not in failed[0]
    # each row's stdout and stderr in runs/<name>.log, beside its folder, not in it
    log = (runner.runs / "debiaspl-cifar10-40-s2.log").read_text()
    assert "stand-in stdout of" in log and "stand-in warning of" in log and "error: stand-in failure" in log
    assert not list(runner.runs.glob("*/*.log")) and not list(runner.runs.glob("*.lock"))
    # a rerun runs only the failed row
    runner.clear()
    proc = runner.run(*CIFAR)
    assert proc.returncode == 0 and runner.names() == ["debiaspl-cifar10-40-s2"], proc.stdout + proc.stderr


def test_dry_run_prints_what_each_row_would_do_and_runs_nothing(runner):
    finished(runner, "debiaspl-cifar10-40-s0")
    checkpointed(runner, "debiaspl-cifar10-40-s1")
    proc = runner.run("--dry-run", *CIFAR40)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [(a, f) for a, f, _ in lines] == [("skip", f"{runner.runs}/debiaspl-cifar10-40-s0"),
                                             ("resume", f"{runner.runs}/debiaspl-cifar10-40-s1"),
                                             ("run", f"{runner.runs}/debiaspl-cifar10-40-s2")]
    assert lines[1][2].endswith(" --resume auto") and "--resume" not in lines[2][2]
    assert runner.records() == [] and not (runner.runs / "run.sh.log").exists()
    assert not (runner.runs / "debiaspl-cifar10-40-s2").exists()


def test_seeds_and_only_select_what_runs(runner):
    proc = runner.run("--seeds", "11 12", "--only", "debiaspl-cifar10-250", "debiaspl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runner.names() == ["debiaspl-cifar10-250-s11", "debiaspl-cifar10-250-s12"]
    assert [flag(r["argv"], "--seed") for r in runner.records()] == ["11", "12"]


def intervals(runner):
    ends = {r["pid"]: r["t"] for r in runner.records("end")}
    return [(r["name"], r["cuda"], r["t"], ends[r["pid"]]) for r in runner.records()]


def test_gpus_one_row_per_gpu_at_a_time(runner):
    proc = runner.run("--gpus", "0,1,2", "debiaspl", "--only", "^debiaspl-(cifar10-.*|imagenet-(zsl|1p))$",
                      STANDIN_SLEEP="0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the 8-GPU row cannot run on 3 GPUs
    assert re.search(r"failed debiaspl-imagenet-1p not run: it needs 8 GPUs, --gpus lists 3", runner.log())
    spans = intervals(runner)
    assert sorted(n for n, *_ in spans) == sorted(["debiaspl-imagenet-zsl"] + [
        f"debiaspl-cifar10-{n}-s{s}" for n in (40, 250) for s in (0, 1, 2)])
    for name, cuda, *_ in spans:
        gpus = cuda.split(",")
        assert set(gpus) <= {"0", "1", "2"} and len(set(gpus)) == len(gpus) == (2 if "zsl" in name else 1), cuda
    zsl = next(r for r in runner.records() if r["name"] == "debiaspl-imagenet-zsl")
    assert zsl["prog"] == "torchrun" and zsl["argv"][:2] == ["--nproc_per_node", "2"]
    per_gpu = collections.defaultdict(list)
    for name, cuda, t0, t1 in spans:
        for gpu in cuda.split(","):
            per_gpu[gpu].append((t0, t1))
    for gpu, times in per_gpu.items():
        times.sort()
        assert all(b0 >= a1 for (_, a1), (b0, _) in zip(times, times[1:])), (gpu, times)  # never two at once
    # and the GPUs are used side by side
    assert any(a0 < b1 and b0 < a1 for i, (_, _, a0, a1) in enumerate(spans) for (_, _, b0, b1) in spans[i + 1:])


def test_rows_wait_for_the_rows_whose_folders_they_read(runner):
    rows = ["metric_transfer", "--only", "^mt-cifar10-(pretrain|50)$", "--gpus", "0,1,2"]
    proc = runner.run(*rows, STANDIN_FAIL="pretrain")
    assert proc.returncode == 1 and runner.names() == ["mt-cifar10-pretrain"], proc.stdout
    assert len(re.findall(r"failed mt-cifar10-50 not run: it needs mt-cifar10-(pretrain|50),", runner.log())) == 3
    runner.clear()
    proc = runner.run(*rows, STANDIN_SLEEP="0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = intervals(runner)
    steps = [(flag(r["argv"], "--stage"), flag(r["argv"], "--propagation")) for r in runner.records()]
    assert steps == [("pretrain", None), ("propagate", "spectral"), ("finetune", "spectral"), ("propagate", "knn")]
    assert all(b[2] >= a[3] for a, b in zip(spans, spans[1:]))  # one after the other, though GPUs were free
    # each stage is done by its own product: a rerun runs none of them
    runner.clear()
    assert runner.run(*rows).returncode == 0 and runner.names() == []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_killed_runner_stops_its_rows_and_a_rerun_continues(runner, sig, status):
    proc = runner.start(*CIFAR, STANDIN_HANG="^debiaspl-cifar10-40-s2$")
    hung = None
    try:
        deadline = time.time() + 60
        while "debiaspl-cifar10-40-s2" not in runner.names():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        hung = runner.records()[-1]["pid"]
        # to the runner's process group, as Ctrl-C in a terminal or `kill -- -PGID` does: bash ignores a SIGINT
        # sent to itself alone while a foreground child that did not get it runs (its own `date`, say)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if hung is not None and alive(hung):
            os.kill(hung, signal.SIGKILL)
    assert proc.returncode == status, out
    assert not alive(hung) and "stopped debiaspl-cifar10-40-s2" in runner.log()
    assert not list(runner.runs.glob("*.lock"))
    assert runner.names() == ["debiaspl-cifar10-40-s0", "debiaspl-cifar10-40-s1", "debiaspl-cifar10-40-s2"]
    runner.clear()
    proc = runner.run(*CIFAR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runner.names() == ["debiaspl-cifar10-40-s2", "debiaspl-cifar10-250-s0", "debiaspl-cifar10-250-s1",
                              "debiaspl-cifar10-250-s2"]
    assert runner.records()[0]["argv"][-2:] == ["--resume", "auto"]


def test_a_folder_held_by_a_live_process_is_left_alone(runner):
    runner.runs.mkdir()
    (runner.runs / "debiaspl-cifar10-40-s0.lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    proc = runner.run(*CIFAR40)
    assert proc.returncode == 1 and runner.names() == ["debiaspl-cifar10-40-s1", "debiaspl-cifar10-40-s2"]
    assert f"busy debiaspl-cifar10-40-s0 held by {socket.gethostname()} {os.getpid()}" in runner.log()
    # a lock whose process is gone is stale
    gone = subprocess.Popen(["true"])
    gone.wait()
    (runner.runs / "debiaspl-cifar10-40-s0.lock").write_text(f"{socket.gethostname()} {gone.pid}\n")
    runner.clear()
    proc = runner.run(*CIFAR40)
    assert proc.returncode == 0 and runner.names() == ["debiaspl-cifar10-40-s0"], proc.stdout + proc.stderr


def test_the_environment_named_by_run_sh_venv_goes_first_in_path(runner, tmp_path):
    standins(tmp_path / "venv" / "bin")  # what .venv is by default
    proc = runner.run(*CIFAR40, RUN_SH_VENV=str(tmp_path / "venv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["exe"] for r in runner.records()} == {str(tmp_path / "venv" / "bin" / "python")}


def test_a_row_cut_off_before_its_first_checkpoint_resumes(runner):
    # its folder holds args.json and metrics.jsonl but no checkpoint: the scripts refuse it without --resume
    folder = runner.runs / "debiaspl-cifar10-40-s0"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"iter": 5, "top1": 10.0}\n')
    proc = runner.run("debiaspl", "--only", "^debiaspl-cifar10-40-s0$")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["argv"][-2:] for r in runner.records()] == [["--resume", "auto"]]
