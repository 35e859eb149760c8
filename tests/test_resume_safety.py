"""A refused command changes nothing: every script, each way a checkpoint or a folder can fail to fit the command.

Each script makes one tiny run; then commands that must be refused (another split, another network, another
script's checkpoint, no --resume on a folder that holds a run) exit 2 with one line, and the run folder is byte for
byte what it was. In process (main(argv) is what the command line calls) to spare interpreter start-ups.
"""
import importlib

import numpy as np
import pytest
import torch

import fakedata
from common import run as runlib
from runhelpers import snapshot

SCRIPTS = ["selftuning", "debiaspl", "metasemi", "metric_transfer", "usl_t", "usl"]
CHECKPOINTED = SCRIPTS[:-1]  # usl keeps no checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    np.save(d / "features.npy", np.random.RandomState(0).randn(60, 8).astype(np.float32))  # one row per image
    return {"cifar": fakedata.write_cifar(d / "cifar", "cifar10"), "features": d / "features.npy",
            "cars": fakedata.write_finegrained(d / "fg", "StanfordCars", num_classes=4, per_class_train=6,
                                               per_class_test=2, size=36)}


def base_command(script, data):
    """A tiny run of each script, and the flags that change its split and its network."""
    cpu = ["--workers", "0", "--device", "cpu"]
    if script == "selftuning":
        return (["--root", data["cars"], "--label_ratio", "15", "--backbone", "resnet18", "--image_size", "32",
                 "--batch_size", "4", "--queue_size", "4", "--projector_dim", "16", "--max_iter", "2",
                 "--eval_interval", "2", *cpu], ["--label_ratio", "30"], ["--backbone", "resnet34"])
    if script == "debiaspl":
        return (["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "20", "--backbone", "resnet18",
                 "--batch_size", "4", "--mu", "1", "--max_iter", "2", "--image_size", "32", *cpu],
                ["--num_labeled", "30"], ["--backbone", "resnet34"])
    if script == "metasemi":
        return (["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "40", "--backbone", "resnet18",
                 "--batch_size", "8", "--max_iter", "2", "--warmup", "1", *cpu],
                ["--num_labeled", "20"], ["--backbone", "resnet34"])
    if script == "metric_transfer":
        return (["--stage", "all", "--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "20",
                 "--propagation", "knn", "--pseudo_ratio", "0.2", "--max_iter", "2", "--batch_size", "8", *cpu],
                ["--num_labeled", "30"], ["--backbone", "cifar_resnet18"])
    if script == "usl_t":
        return (["--root", data["cifar"], "--dataset", "cifar10", "--budget", "4", "--backbone", "wrn28_2",
                 "--batch_size", "8", "--num_neighbors", "3", "--max_iter", "2", *cpu],
                ["--budget", "5"], ["--backbone", "cifar_resnet18"])
    if script == "usl":
        return (["--root", data["cifar"], "--dataset", "cifar10", "--features", data["features"], "--budget", "10",
                 "--knn_k", "3", *cpu], None, None)
    raise KeyError(script)


def main(script, argv):
    module = importlib.import_module(script)
    runlib.entry(lambda: module.main([str(a) for a in argv]))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One finished tiny run per script: {script: (run folder, its command)}."""
    logdir = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for script in SCRIPTS:
            argv = base_command(script, data)[0] + ["--logdir", logdir, "--run_name", script]
            main(script, argv)
            out[script] = (logdir / script, argv)
    finally:
        torch.set_num_threads(threads)
    return out


def refused(script, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(script, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_refused_commands_leave_the_run_folder_byte_identical(script, runs, data, capsys):
    folder, argv = runs[script]
    before = snapshot(folder)
    assert (folder / "summary.json").exists()
    _, other_split, other_net = base_command(script, data)
    cases = {"no --resume": (argv, "already holds a run")}
    if script in CHECKPOINTED:
        other_script = next(s for s in CHECKPOINTED if s != script)
        cases.update({
            "another split": (argv + other_split + ["--resume", "auto"], other_split[0]),
            "another network": (argv + other_net + ["--resume", "auto"], other_net[0]),
            "another script's checkpoint": (argv + ["--resume", runs[other_script][0] / "checkpoint.pt"],
                                            f"written by {other_script}.py; this is {script}.py")})
    for case, (command, words) in cases.items():
        line = refused(script, command, capsys)
        assert words in line, (case, line)
        assert snapshot(folder) == before, case


@pytest.mark.parametrize("script", ["selftuning", "debiaspl", "metasemi"])
def test_weights_that_fail_to_load_leave_no_run_folder(script, data, tmp_path, capsys):
    argv = base_command(script, data)[0] + ["--pretrained", tmp_path / "missing.pth", "--logdir", tmp_path / "runs"]
    line = refused(script, argv, capsys)
    assert "missing.pth" in line
    assert not (tmp_path / "runs").exists()


def test_resume_names_the_flags_the_checkpoint_keeps(runs, tmp_path, capsys):
    import shutil
    folder, argv = runs["selftuning"]
    shutil.copytree(folder, tmp_path / "copy")
    capsys.readouterr()
    main("selftuning", argv + ["--lr", "0.5", "--logdir", tmp_path, "--run_name", "copy", "--resume", "auto"])
    out = capsys.readouterr().out
    assert "resuming keeps the checkpoint's --lr 0.001 (asked: --lr 0.5)" in out
