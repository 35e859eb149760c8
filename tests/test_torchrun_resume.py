"""Under torchrun a run stopped and resumed ends where the uninterrupted run ends: every rank's RNG is saved and
restored (each rank draws its own augmentations), not rank 0's alone."""
import json

import pytest
import torch

import fakedata
from conftest import assert_ok, run_script


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"cifar": fakedata.write_cifar(d / "cifar", "cifar10"),
            "cars": fakedata.write_finegrained(d / "fg", "StanfordCars", num_classes=4, per_class_train=6,
                                               per_class_test=2, size=36)}


def command(script, data, iters):
    cpu = ["--workers", "0", "--device", "cpu", "--deterministic"]
    if script == "selftuning.py":
        return ["--root", data["cars"], "--label_ratio", "30", "--backbone", "resnet18", "--image_size", "32",
                "--batch_size", "4", "--queue_size", "4", "--projector_dim", "16", "--max_iter", "4",
                "--stop_after", iters, "--eval_interval", "2", *cpu]
    if script == "debiaspl.py":
        return ["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "20", "--backbone", "resnet18",
                "--batch_size", "4", "--mu", "1", "--max_iter", "4", "--stop_after", iters, "--eval_interval", "2",
                "--image_size", "32", *cpu]
    return ["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "40", "--backbone", "resnet18",
            "--batch_size", "8", "--max_iter", "4", "--stop_after", iters, "--warmup", "1", "--eval_interval", "2",
            *cpu]


def evaluations(folder):
    return [(m["iter"], m["top1"], m["top5"]) for m in map(json.loads, (folder / "metrics.jsonl").open())]


@pytest.mark.parametrize("script", ["selftuning.py", "debiaspl.py", "metasemi.py"])
def test_two_process_run_stopped_and_resumed_equals_the_uninterrupted_one(script, data, tmp_path, env):
    def launch(iters, name, *extra):
        assert_ok(run_script(script, *command(script, data, iters), "--logdir", tmp_path, "--run_name", name, *extra,
                             env=env, torchrun=2, timeout=300))
    launch("4", "whole")
    launch("2", "cut")
    launch("4", "cut", "--resume", "auto")
    # the stopped run also evaluated where it stopped; every evaluation of the whole run is in it, equal
    whole, cut = evaluations(tmp_path / "whole"), evaluations(tmp_path / "cut")
    assert set(whole) <= set(cut) and whole[-1] == cut[-1]
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("whole", "cut"))
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == len(b["rng"]) == 2
    model = "qnet" if script == "selftuning.py" else "model"
    for k in a[model]:
        assert torch.equal(a[model][k], b[model][k]), k
