"""DebiasPL iteration vs the same iteration with --tau 0 (plain FixMatch with an EMAN teacher).

Both steps run debiaspl.train_step (student forward on labeled + strong views, eval-mode teacher on the weak views,
the loss, SGD, the in-place EMAN update) with the same flags: --multiviews --eman --CLDLoss, ImageNet's 1000
classes. Debiasing adds a log, a softmax shift and a 1000-vector momentum update per iteration, so the target is
a ratio of at most 1.05x.

    python benchmarks/step_cost.py debiaspl --threads 2 --backbone resnet18 --image_size 64 --batch_size 4 --mu 2
"""
import argparse

import torch

import debiaspl
from common import backbones


def add_args(parser):
    parser.add_argument("--backbone", default="resnet18", help="backbone of both steps (default: resnet18)")
    parser.add_argument("--image_size", type=int, default=64, help="input size (default: 64)")
    parser.add_argument("--batch_size", type=int, default=4, help="labeled batch (default: 4)")
    parser.add_argument("--mu", type=int, default=2, help="unlabeled images per labeled image (default: 2)")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes (default: 1000, ImageNet)")
    parser.add_argument("--tau", type=float, default=0.4, help="debiasing strength of the DebiasPL step (default: 0.4)")
    parser.add_argument("--no_cld", action="store_true", help="leave the CLD loss out of both steps")


def build(args):
    g = torch.Generator().manual_seed(1)
    b, u, s = args.batch_size, args.batch_size * args.mu, args.image_size
    x = torch.randn(b, 3, s, s, generator=g)
    y = torch.randint(0, args.num_classes, (b,), generator=g)
    views = [torch.randn(u, 3, s, s, generator=g) for _ in range(4)]  # w1, w2, s1, s2
    device = torch.device("cpu")

    def stepper(tau):
        torch.manual_seed(0)
        model = debiaspl.FixMatch(debiaspl.Classifier(backbones.build(args.backbone), args.num_classes, 0.45),
                                  eman=True).train()
        opt = torch.optim.SGD(model.parameters(), 0.003, momentum=0.9, weight_decay=1e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        flags = argparse.Namespace(tau=tau, threshold=0.7, qhat_m=0.999, lambda_u=10.0, CLDLoss=not args.no_cld,
                                   lambda_cld=0.3, cld_groups="argmin", cld_temperature=0.07, multiviews=True,
                                   eman=True, ema_m=0.999, amp="off")
        state = {"qhat": torch.full((args.num_classes,), 1.0 / args.num_classes)}

        def step():
            _, _, state["qhat"], _, _ = debiaspl.train_step(model, opt, scaler, x, y, views, state["qhat"], flags,
                                                            device)
        return step

    return {"FixMatch-EMAN (--tau 0)": stepper(0.0), f"DebiasPL (--tau {args.tau})": stepper(args.tau)}
