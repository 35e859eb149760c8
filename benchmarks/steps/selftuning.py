"""Self-Tuning iteration vs a plain supervised fine-tuning step (cross-entropy on the labeled batch only).

Both steps use the script's own code (selftuning.selftuning_losses), the same backbone, image size, batch, head
sizes and Nesterov SGD; the baseline is the script's --no-pgc path. A Self-Tuning iteration runs two query
forward+backward passes (labeled and unlabeled view a) and two key forwards (view b), about 8/3 of the baseline when
a backward costs two forwards; the rest is the PGC loss, the queue scatter and the momentum updates.

    python benchmarks/step_cost.py selftuning --threads 2 --backbone resnet18 --image_size 112 --batch_size 16
"""
import torch

import selftuning as st
from common import backbones


def add_args(parser):
    parser.add_argument("--backbone", default="resnet18", help="backbone of both steps (default: resnet18)")
    parser.add_argument("--image_size", type=int, default=112, help="input size (default: 112)")
    parser.add_argument("--batch_size", type=int, default=16, help="labeled (and unlabeled) batch (default: 16)")
    parser.add_argument("--num_classes", type=int, default=200, help="classes, CUB's 200 (default: 200)")
    parser.add_argument("--queue_size", type=int, default=32, help="keys per class (default: 32)")
    parser.add_argument("--projector_dim", type=int, default=1024, help="projection size (default: 1024)")
    parser.add_argument("--ema_per_forward", action="store_true", default=True,
                        help="two momentum updates per iteration, as the reference (default)")
    parser.add_argument("--ema_per_step", dest="ema_per_forward", action="store_false",
                        help="one momentum update per iteration")


def _nets(args, pgc):
    torch.manual_seed(0)
    encoder = st.Encoder(backbones.build(args.backbone), args.projector_dim,
                         0.3 if args.backbone == "efficientnet_b2" else 0.0)
    qnet = st.QueryNet(encoder, args.num_classes)
    if not pgc:
        encoder.projector.requires_grad_(False)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": params}, {"params": qnet.classifier.parameters(), "lr": 1e-2}], lr=1e-3,
                          momentum=0.9, weight_decay=1e-4, nesterov=True)
    key = st.KeyEncoder(encoder, 0.999) if pgc else None
    queue = st.ClassQueue(args.projector_dim, args.num_classes, args.queue_size)
    return qnet.train(), encoder, key, queue, opt


def build(args):
    g = torch.Generator().manual_seed(1)
    b, s = args.batch_size, args.image_size
    views = [torch.randn(b, 3, s, s, generator=g) for _ in range(4)]
    y = torch.randint(0, args.num_classes, (b,), generator=g)

    def stepper(pgc):
        qnet, encoder, key, queue, opt = _nets(args, pgc)
        x_l = (views[0], views[1]) if pgc else views[0]
        x_u = (views[2], views[3]) if pgc else None

        def step():
            out = st.selftuning_losses(qnet, encoder, key, queue, x_l, y, x_u, 0.07, args.ema_per_forward, pgc)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        return step

    def passes_only():
        # The floor of a Self-Tuning iteration: its network passes (two query forward+backward, two key forwards)
        # and the SGD step, without PGC loss, queue or momentum update. On CPUs a backward often costs less than
        # two forwards, which lifts this floor above the 8/3 of the pass-count estimate.
        qnet, encoder, key, _, opt = _nets(args, True)

        def step():
            proj_l, logits_l, proj_u, _ = qnet(views[0], views[2])
            key(views[1]), key(views[3])
            loss = torch.nn.functional.cross_entropy(logits_l, y) + proj_l.square().mean() + proj_u.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    return {"fine-tuning (CE on the labeled batch)": stepper(False), "self-tuning iteration": stepper(True),
            "floor: the same network passes only": passes_only()}
