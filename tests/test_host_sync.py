"""No host synchronisation on iterations that neither log nor evaluate: every value the loop reads back (the loss for
the finiteness check and the progress line, the logged means) stays on the device until a logging step.

A read is counted when a tensor is turned into a Python value (item, float, int, bool, tolist, numpy), or goes
through an op whose output shape depends on its values (a boolean mask, nonzero, unique), in the training loop, not
in the input pipeline (common.loaders and the transforms it calls run on the host anyway). A run
of 3 iterations and one of 9 log and evaluate once, at their last iteration; the 6 iterations more must add no read.
"""
import importlib
import traceback

import pytest
import torch

import fakedata

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "__index__")
# Ops whose output shape depends on the values: on a GPU each waits for the device to know its size.
SHAPED = ("nonzero", "unique", "masked_select", "argwhere")
# The input pipeline runs on the host; so does an optimizer's step counter (a CPU tensor even for CUDA parameters,
# unless capturable), which Adam reads every step.
PIPELINE = ("common/loaders.py", "common/dali.py", "/torchvision/", "/PIL/", "/torch/optim/")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"cifar": str(fakedata.write_cifar(d / "cifar", "cifar10")),
            "cars": str(fakedata.write_finegrained(d / "fg", "StanfordCars", num_classes=4, per_class_train=6,
                                                   per_class_test=2, size=36))}


def command(script, data, iters):
    cpu = ["--workers", "0", "--device", "cpu", "--max_iter", str(iters), "--eval_interval", "1000",
           "--log_interval", "1000"]
    if script == "selftuning":
        return ["--root", data["cars"], "--label_ratio", "30", "--backbone", "resnet18", "--image_size", "32",
                "--batch_size", "4", "--queue_size", "4", "--projector_dim", "16", *cpu]
    if script == "debiaspl":
        return ["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "20", "--backbone", "resnet18",
                "--batch_size", "4", "--mu", "1", "--image_size", "32", "--eman", *cpu]
    if script == "metasemi":
        return ["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "40", "--backbone", "resnet18",
                "--batch_size", "8", "--warmup", "1", *cpu]
    if script == "metric_transfer":
        return ["--stage", "pretrain", "--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", "20",
                "--nce_k", "16", "--backbone", "resnet18", "--batch_size", "8", *cpu]
    # a pass of 15 steps, so that no end-of-pass checkpoint (a logging step) falls in the 9 iterations; the
    # ImageNet recipe's cluster re-seeding is checked at every step from the first
    reseeding = ["--reassign_after_steps", "0"] if script == "usl_t_reseeding" else []
    return [*reseeding, "--root", data["cifar"], "--dataset", "cifar10", "--budget", "4", "--backbone", "wrn28_2",
            "--batch_size", "4", "--num_neighbors", "3", *cpu]


def reads_of_a_run(script, argv, monkeypatch):
    count = [0]

    def outside_pipeline():
        return not any(p in f.filename for f in traceback.extract_stack(limit=40)[:-2] for p in PIPELINE)

    def counted(plain, reads=lambda *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            if reads(*args, **kwargs) and outside_pipeline():
                count[0] += 1
            return plain(*args, **kwargs)
        return wrapper

    def by_mask(self, index, *rest):
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    with monkeypatch.context() as m:
        for name in READS + SHAPED:
            m.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        for name in SHAPED:
            m.setattr(torch, name, counted(getattr(torch, name)))
        m.setattr(torch.Tensor, "__getitem__", counted(torch.Tensor.__getitem__, by_mask))
        importlib.import_module(script).main(argv)
    return count[0]


@pytest.mark.parametrize("script", ["debiaspl", "metasemi", "selftuning", "metric_transfer", "usl_t",
                                    "usl_t_reseeding"])
def test_iterations_that_neither_log_nor_evaluate_read_nothing_back(script, data, tmp_path, monkeypatch, one_thread):
    module = script.split("_reseeding")[0]
    short = reads_of_a_run(module, [*command(script, data, 3), "--logdir", str(tmp_path), "--run_name", "a"],
                           monkeypatch)
    long = reads_of_a_run(module, [*command(script, data, 9), "--logdir", str(tmp_path), "--run_name", "b"],
                          monkeypatch)
    assert long - short == 0, f"{script}: {long - short} host reads in 6 iterations that neither log nor evaluate"
