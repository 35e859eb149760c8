"""MetaSemi iteration vs the same iteration without the meta step (pseudo-labels = the eval-mode predictions).

All steps run metasemi.train_step with --mix_up on the same network and the same fixed batches: the baseline
(--no-meta) makes one eval-mode unlabeled forward, the mixed and the unlabeled training forwards and one backward
over both; the meta step adds one eval-mode labeled forward + backward and two perturbed unlabeled forwards (fd), or
one forward-mode pass in place of the three unlabeled forwards (jvp). Counting a backward as two forwards: 12/7 =
1.71x (2.0x if the labeled and unlabeled batches cost the same as the training passes) for fd; the jvp and `--meta_p
mean` (11/7 = 1.57x) ratios are printed beside it. The "piece" rows time the meta step's parts alone (the breakdown):
the fd step should cost the baseline + one labeled forward + backward + two perturbed forwards.

    python benchmarks/step_cost.py metasemi --threads 1 --arch convlarge --batch_size 8
"""
import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

import metasemi
from common import backbones


def add_args(parser):
    parser.add_argument("--arch", default="convlarge", help="backbone of every step (default: convlarge)")
    parser.add_argument("--image_size", type=int, default=32, help="input size (default: 32)")
    parser.add_argument("--batch_size", type=int, default=8, help="labeled = unlabeled batch (default: 8)")
    parser.add_argument("--num_classes", type=int, default=10, help="classes (default: 10)")


def build(args):
    g = torch.Generator().manual_seed(1)
    b, s = args.batch_size, args.image_size
    x_l = torch.randn(b, 3, s, s, generator=g)
    y_l = torch.randint(0, args.num_classes, (b,), generator=g)
    x_u = torch.randn(b, 3, s, s, generator=g)
    device = torch.device("cpu")

    def stepper(meta, meta_grad="fd", meta_p="eval"):
        torch.manual_seed(0)
        net = metasemi.Classifier(backbones.build(args.arch), args.num_classes).train()
        opt = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        flags = argparse.Namespace(meta=meta, meta_grad=meta_grad, meta_p=meta_p, epsilon=0.01, mix_up=True,
                                   alpha=1.0, amp="off")

        def step():
            metasemi.train_step(net, net, opt, scaler, x_l, y_l, x_u, 0.01, 1.0, flags, args.num_classes, device)
        return step

    # The pieces of the meta step, each alone on the same network, for the breakdown: what the fd step adds to the
    # baseline should be one labeled forward + backward and two perturbed forwards.
    torch.manual_seed(0)
    net = metasemi.Classifier(backbones.build(args.arch), args.num_classes).eval()
    names, params = zip(*[(n, q) for n, q in net.named_parameters() if q.requires_grad])
    shifted = dict(zip(names, [q.detach() + 1e-3 for q in params]))

    def labeled_forward_backward():
        torch.autograd.grad(F.cross_entropy(net(x_l), y_l), params)

    @torch.no_grad()
    def eval_forward():
        net(x_u)

    @torch.no_grad()
    def perturbed_forward():
        functional_call(net, shifted, (x_u,))

    def meta_direction():
        metasemi.meta_direction(net, x_l, y_l, x_u)

    # --meta_p mean: how far its pseudo-labels are from the default's, on these batches
    y_eval = metasemi.meta_pseudo_labels(net, x_l, y_l, x_u, 0.1)[1]
    y_mean = metasemi.meta_pseudo_labels(net, x_l, y_l, x_u, 0.1, meta_p="mean")[1]
    print(f"--meta_p mean vs eval, lr 0.1: pseudo-labels differ by at most {(y_mean - y_eval).abs().max():.2e} "
          f"(largest entry {y_eval.abs().max():.2f}), same argmax for {(y_mean.argmax(1) == y_eval.argmax(1)).float().mean():.0%}")

    return {"no meta step (eval-mode pseudo-labels)": stepper(False), "MetaSemi --meta_grad fd": stepper(True, "fd"),
            "MetaSemi --meta_grad jvp": stepper(True, "jvp"), "MetaSemi fd --meta_p mean": stepper(True, "fd", "mean"),
            "  piece: meta_direction fd": meta_direction,
            "  piece: labeled eval forward + backward": labeled_forward_backward,
            "  piece: unlabeled eval forward": eval_forward, "  piece: perturbed forward (functional_call)":
            perturbed_forward}
