"""The run plumbing: flags, run folder, atomic checkpoints, resume bookkeeping, RNG state, collectives."""
import argparse
import json
import textwrap

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
    run = R.Run(make_args(tmp_path), "fixmatch", "cifar10", 40)
    assert run.dir == tmp_path / "fixmatch-cifar10-40-s1"
    saved = json.loads((run.dir / "args.json").read_text())
    assert saved["flags"]["batch_size"] == 64 and saved["versions"]["torch"] == torch.__version__
    run.finish()


def test_existing_checkpoint_needs_resume_and_nothing_is_deleted(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4)
    run.log_eval(1, 10.0, 20.0)
    run.save_checkpoint({"step": 1})
    run.finish()
    with pytest.raises(UserError, match="--resume auto"):
        R.Run(make_args(tmp_path), "m", "d", 4)
    assert (run.dir / "checkpoint.pt").exists() and (run.dir / "metrics.jsonl").exists()


def test_resume_restores_history_and_drops_evaluations_after_the_checkpoint(tmp_path):
    run = R.Run(make_args(tmp_path), "m", "d", 4)
    run.log_eval(10, 50.0, 90.0)
    run.save_checkpoint({"step": 10, "labeled": np.arange(4)})
    run.log_eval(20, 60.0, 95.0)  # logged by a run that then died before its next checkpoint
    again = R.Run(make_args(tmp_path, resume="auto"), "m", "d", 4)
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
    run = R.Run(make_args(tmp_path), "m", "d", 4)
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
    run = R.Run(make_args(tmp_path), "m", "d", 4)
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
