"""The run plumbing: flags, run folder, atomic checkpoints, resume bookkeeping, RNG state, collectives."""
import argparse
import json
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from common import UserError
from common import run as R
from conftest import assert_ok, run_script


def make_args(tmp_path, **kw):
    parser = R.add_standard_flags(R.Parser())
    parser.add_argument("--seed", type=int, default=1, help="seed")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch")
    return parser.parse_args([f"--logdir={tmp_path}", *[f"--{k}={v}" for k, v in kw.items()]])


def test_parser_accepts_dashed_spelling_and_shows_defaults(tmp_path, capsys):
    parser = R.add_standard_flags(R.Parser())
    parser.add_argument("--batch_size", type=int, default=64, help="global batch")
    assert parser.parse_args(["--batch-size", "8"]).batch_size == 8
    assert parser.parse_args(["--batch_size", "9"]).batch_size == 9
    assert "(default: 64)" in parser.format_help()
    assert parser.parse_args(["--resume"]).resume == "auto"
    assert parser.parse_args(["--run-name", "a"]).run_name == "a"  # flags added through argument groups too
    group = parser.add_argument_group("method")
    group.add_argument("--queue_size", type=int, default=32, help="keys per class")
    assert parser.parse_args(["--queue-size", "4"]).queue_size == 4 and "(default: 32)" in parser.format_help()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--device", "tpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_run_folder_name_and_args_json(tmp_path):
    run = R.Run(make_args(tmp_path), "fixmatch", "cifar10", 40).start()
    assert run.dir == tmp_path / "fixmatch-cifar10-40-s1"
    saved = json.loads((run.dir / "args.json").read_text())
    assert saved["flags"]["batch_size"] == 64 and saved["versions"]["torch"] == torch.__version__
    run.finish()


def test_existing_checkpoint_needs_resume_and_nothing_is_deleted(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.log_eval(1, 10.0, 20.0)
    run.save_checkpoint({"step": 1})
    run.finish()
    with pytest.raises(UserError, match="--resume auto"):
        R.Run(make_args(tmp_path), "m", "d", 4)
    assert (run.dir / "checkpoint.pt").exists() and (run.dir / "metrics.jsonl").exists()


def test_resume_restores_history_and_drops_evaluations_after_the_checkpoint(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.log_eval(10, 50.0, 90.0)
    run.save_checkpoint({"step": 10, "labeled": np.arange(4)})
    run.log_eval(20, 60.0, 95.0)  # logged by a run that then died before its next checkpoint
    again = R.Run(make_args(tmp_path, resume="auto"), "m", "d", 4).start()
    assert again.resume_state["step"] == 10
    assert again.resume_state["labeled"].tolist() == [0, 1, 2, 3]
    lines = (again.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["iter"] for l in lines] == [10]
    again.log_eval(20, 70.0, 96.0)
    again.log_eval(30, 80.0, 97.0)
    summary = again.finish(extra=1)
    assert summary["final_top1"] == 80.0 and summary["best_top1"] == 80.0
    assert summary["median_last_top1"] == 70.0 and summary["extra"] == 1
    assert summary["iters"] == 30 and "wall_s" in summary


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.save_checkpoint({"step": 1})

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        run.save_checkpoint({"step": 2})
    assert R.load_file(run.dir / "checkpoint.pt")["step"] == 1
    assert [p.name for p in run.dir.iterdir() if p.name.startswith(".")] == []


def test_rng_state_round_trip():
    state = R.rng_state()
    a = (np.random.rand(), torch.rand(1).item())
    R.set_rng_state(state)
    assert (np.random.rand(), torch.rand(1).item()) == a


def test_check_finite_names_step_and_checkpoint(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    R.check_finite(torch.tensor(1.0), 3, run)
    with pytest.raises(UserError, match="iteration 7.*no checkpoint"):
        R.check_finite(torch.tensor(float("nan")), 7, run)


def test_accuracy_on_hand_made_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 1, 1])
    # top-1 hits: sample 0 only -> 25%; top-2 hits: samples 0, 1 (2 is 2nd), 2 (1 is 2nd) -> 75%; top-5 -> 100%
    assert R.accuracy(logits, targets, topk=(1, 2, 5)) == [25.0, 75.0, 100.0]


def test_load_file_refuses_python_objects_unless_trusted(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"opt": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UserError, match="--trust_checkpoint"):
        R.load_file(path)
    assert R.load_file(path, trust=True)["opt"].lr == 0.1


def test_two_process_collectives(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(textwrap.dedent("""
        import torch
        from common import distributed
        d = distributed.init("cpu")
        assert d.world_size == 2
        x = torch.full((2, 3), float(d.rank))
        assert distributed.all_gather_cat(x)[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
        assert distributed.all_reduce_mean(torch.tensor([float(d.rank)])).item() == 0.5
        assert distributed.broadcast_object({"split": [d.rank]}) == {"split": [0]}
        model = distributed.wrap(torch.nn.Linear(3, 1), d)
        model(x).sum().backward()
        distributed.barrier()
        print("rank", d.rank, "ok")
        distributed.shutdown()
    """))
    proc = run_script(script, torchrun=2, timeout=180)
    assert_ok(proc)
    assert proc.stdout.count("ok") == 2


def test_nothing_is_written_before_start(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4)
    assert not run.dir.exists()
    with pytest.raises(RuntimeError, match="start"):
        run.log_eval(1, 10.0)
    with pytest.raises(RuntimeError, match="start"):
        run.save_checkpoint({"step": 1})
    run.start()
    assert sorted(p.name for p in run.dir.iterdir() if not p.name.startswith("events")) == ["args.json",
                                                                                           "metrics.jsonl"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_checkpoint_of_another_script_or_other_fixed_flags_is_refused_before_any_write(tmp_path):
    run = R.Run(make_args(tmp_path, batch_size=8, run_name="r"), "selftuning-ft", "d", 4, fixed=("batch_size",)).start()
    run.log_eval(1, 10.0)
    run.save_checkpoint({"step": 1})
    before = snapshot(run.dir)
    with pytest.raises(UserError) as e:
        R.Run(make_args(tmp_path, resume="auto", run_name="r"), "metasemi", "d", 4, fixed=("batch_size",))
    assert str(e.value).startswith(f"{run.dir / 'checkpoint.pt'} was written by selftuning.py; this is metasemi.py")
    with pytest.raises(UserError) as e:
        R.Run(make_args(tmp_path, resume="auto", run_name="r"), "selftuning", "d", 4, fixed=("batch_size",))
    assert "was made with --batch_size 8; this command asks for --batch_size 64" in str(e.value)
    torch.save({"step": 1, "model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="is not a checkpoint of these scripts"):
        R.Run(make_args(tmp_path, resume=tmp_path / "foreign.pt", run_name="other"), "m", "d", 4)
    assert snapshot(run.dir) == before and not (tmp_path / "other").exists()
    # the same script and the same fixed flags resume
    again = R.Run(make_args(tmp_path, resume="auto", batch_size=8, run_name="r"), "selftuning", "d", 4, fixed=("batch_size",))
    assert again.resume_state["step"] == 1


def test_a_folder_with_evaluations_but_no_checkpoint_gets_no_duplicates(tmp_path):
    # killed after its first evaluation, before its first checkpoint
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.log_eval(5, 10.0)
    before = snapshot(run.dir)
    with pytest.raises(UserError, match="already holds a run .*metrics.jsonl.*--resume auto"):
        R.Run(make_args(tmp_path), "m", "d", 4)
    assert snapshot(run.dir) == before
    again = R.Run(make_args(tmp_path, resume="auto"), "m", "d", 4).start()  # nothing to resume: a fresh start
    assert again.resume_state is None and (again.dir / "metrics.jsonl").read_text() == ""
    again.log_eval(5, 11.0)
    lines = (again.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["top1"] for l in lines] == [11.0]


def test_start_removes_temporaries_of_killed_writes_only(tmp_path):
    import os
    import subprocess
    import sys
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.save_checkpoint({"step": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run.dir / f".checkpoint.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (run.dir / f".checkpoint.pt.tmp{os.getpid()}").write_bytes(b"being written")  # a live writer's
    R.Run(make_args(tmp_path, resume="auto"), "m", "d", 4).start()
    assert not (run.dir / f".checkpoint.pt.tmp{dead}").exists()
    assert (run.dir / f".checkpoint.pt.tmp{os.getpid()}").exists()


def test_resume_says_which_flags_the_checkpoint_keeps(tmp_path, capsys):
    parser_args = make_args(tmp_path, batch_size=8)
    run = R.Run(parser_args, "m", "d", 4, kept=("batch_size", "seed")).start()
    run.save_checkpoint({"step": 1})
    capsys.readouterr()
    R.Run(make_args(tmp_path, resume="auto", batch_size=16), "m", "d", 4, kept=("batch_size", "seed")).start()
    out = capsys.readouterr().out
    assert "resuming keeps the checkpoint's --batch_size 8 (asked: --batch_size 16)" in out
    R.Run(make_args(tmp_path, resume="auto", batch_size=8), "m", "d", 4, kept=("batch_size",)).start()
    assert "keeps" not in capsys.readouterr().out


def test_rng_states_of_a_single_process_restore():
    states = R.rng_states()
    a = torch.rand(2)
    R.restore_rng_states(states, 0, reseed=lambda: pytest.fail("same world size: no reseed"))
    assert torch.equal(torch.rand(2), a)
    called = []
    R.restore_rng_states(states * 2, 0, reseed=lambda: called.append(1))  # saved by two processes
    assert called == [1]


def test_log_line_shows_rate_and_eta_and_restarts_with_a_new_stage(tmp_path, capsys, monkeypatch):
    args = make_args(tmp_path)
    args.progress = False
    run = R.Run(args, "m", "d", 4).start()
    clock = iter([1000.0, 1040.0, 1050.0, 1100.0])
    monkeypatch.setattr(R, "time", types.SimpleNamespace(time=lambda: next(clock)))  # this module's clock only
    run.progress(10, 110, loss=0.5)    # first line: no rate yet
    run.progress(30, 110, loss=0.25)   # 20 iterations in 40 s: 0.5 it/s, 80 left: 2:40
    run.progress(35, 110, loss=0.2)    # 10 s after the last line: quiet
    run.progress(2, 50)                # a later stage counts from 1 again
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[m-d-4-s1] iter 10/110 loss 0.5 | - it/s, ETA -",
                     "[m-d-4-s1] iter 30/110 loss 0.25 | 0.5 it/s, ETA 0:02:40",
                     "[m-d-4-s1] iter 2/50 | - it/s, ETA -"]


def test_stop_leaves_an_unfinished_run_that_resumes(tmp_path, capsys):
    run = R.Run(make_args(tmp_path), "m", "d", 4).start()
    run.log_eval(2, 40.0, 80.0)
    run.save_checkpoint({"step": 2})
    run.stop(2, 10)
    assert capsys.readouterr().out.strip().endswith(
        "stopped after iteration 2 of 10 (--stop_after); continue with --resume auto")
    assert not (run.dir / "summary.json").exists() and (run.dir / "checkpoint.pt").exists()
    again = R.Run(make_args(tmp_path, resume="auto"), "m", "d", 4)
    assert again.resume_state["step"] == 2


def test_restore_loads_every_entry_or_names_the_one_that_does_not_fit():
    net, opt_net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(opt_net.parameters(), lr=0.1, momentum=0.9)
    buf = torch.zeros(4)
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "optimizer": opt.state_dict(), "queue": torch.arange(4.0)}
    R.restore(state, {"model": net, "optimizer": opt, "queue": buf})
    assert torch.equal(net.weight, state["model"]["weight"]) and buf.tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match=r"the checkpoint's model does not fit --backbone x \(.*size mismatch"):
        R.restore({"model": torch.nn.Linear(3, 5).state_dict()}, {"model": net}, fits="--backbone x")
    with pytest.raises(UserError, match=r"the checkpoint's queue does not fit this command \(shape \(4,\), here \(2,\)"):
        R.restore(state, {"queue": torch.zeros(2)})
    with pytest.raises(UserError, match="the checkpoint's scaler does not fit"):
        R.restore(state, {"scaler": net})


def test_means_sum_on_the_device_and_read_once():
    m = R.Means()
    assert m.read() == {}
    m.add(loss=torch.tensor(1.0), acc=torch.tensor(0.5), data_s=0.25)
    m.add(loss=torch.tensor(3.0), acc=torch.tensor(1.0), data_s=0.75)
    assert m.read() == {"loss": 2.0, "acc": 0.75, "data_s": 0.5}  # in the order added, Python floats
    assert m.read() == {}  # a new interval
    m.add(loss=torch.tensor(float("nan")))
    m.add(loss=torch.tensor(1.0))
    with pytest.raises(UserError, match="the loss is nan at iteration 2"):  # one bad step spoils the interval's mean
        R.check_finite(m.read()["loss"], 2, types.SimpleNamespace(path=lambda name: Path("/nonexistent") / name))
