"""Run plumbing shared by every script: flags, seeding, devices, the run folder, logging, checkpoints, errors.

A run lives in `<logdir>/<run_name>/`: `args.json`, tensorboardX events, `metrics.jsonl` (one line per evaluation),
`checkpoint.pt` (written atomically) and, at the end, `summary.json` (README, "Where outputs go").
"""
import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import UserError
from common import distributed


# ---------------------------------------------------------------------------------------------------------------- flags
# The flags that several scripts share, with their one meaning (README, "Shared flags"). A script adds one with
# `group.add_argument("--max_iter", shared=True, ...)`: the type and the meaning come from here, the script adds its
# aliases, its default and, after a "; ", what the flag does in that script in particular.
SHARED = {
    "root": dict(help="dataset folder"),
    "dataset": dict(help="dataset name (default: inferred from the folder name of --root)"),
    "download": dict(action=argparse.BooleanOptionalAction, default=False,
                     help="download and extract the dataset when its files are absent (under torchrun rank 0 "
                          "downloads, the others wait)"),
    "recipe": dict(help="the per-dataset defaults: one column of the recipe table below; a flag given on the "
                        "command line wins (default: from --dataset)"),
    "backbone": dict(help="network"),
    "pretrained": dict(nargs="?", const=True, metavar="PATH",
                       help="initial weights of the network this script trains: no value = the torchvision / "
                            "official weights of --backbone, PATH = a local checkpoint (MoCo, MoCo-EMAN, CLD or "
                            "torchvision format)"),
    "num_labeled": dict(type=int, help="number of labeled images (a per-class split needs a multiple of the "
                                       "number of classes)"),
    "budget": dict(type=int, help="number of images to select for labeling"),
    "batch_size": dict(type=int, help="images per iteration over all ranks (global)"),
    "workers": dict(type=int, help="data-loading processes per rank"),
    "lr": dict(type=float, help="learning rate"),
    "weight_decay": dict(type=float, help="weight decay"),
    "seed": dict(type=int, help="random seed"),
    "max_iter": dict(type=int, help="the run's length in iterations, hence the schedule's"),
    "epochs": dict(type=int, help="the run's length in passes over the training data, when --max_iter is not given"),
    "stop_after": dict(type=int, metavar="N",
                       help="stop after N iterations with the schedule unchanged (continue with --resume auto)"),
    "eval_interval": dict(type=int, metavar="N", help="iterations between evaluations"),
    "log_interval": dict(type=int, metavar="N",
                         help="iterations between train/* scalars, the progress values and the non-finite loss check: "
                              "the only iterations that read values back from the device, besides evaluations"),
    "dali": dict(action=argparse.BooleanOptionalAction, default=False,
                 help="load and augment with NVIDIA DALI (the same crops and augmentation parameters as the "
                      "torchvision path)"),
}
FROM_RECIPE = "from --recipe"  # what --help shows as the default of a flag that the recipe table fills


def _spellings(names, kwargs, parser):
    """The shared meaning of a `shared=True` flag, the dashed spelling of every `--snake_case` name and the default in
    the help string; a `recipe=True` flag (default None) is recorded for `apply_recipe`."""
    names = list(names)
    dest = names[0].lstrip("-").replace("-", "_")
    if kwargs.pop("shared", False):
        meaning = dict(SHARED[dest])
        note = kwargs.pop("help", None)
        kwargs = {**meaning, **kwargs, "help": meaning["help"] + (f"; {note}" if note else "")}
    if kwargs.pop("recipe", False):
        if kwargs.get("default") is not None:
            raise ValueError(f"{names[0]}: a recipe flag's default is the recipe's")
        parser.recipe_flags.add(kwargs.get("dest", dest))
        kwargs["help"] = f"{kwargs.get('help', '')} (default: {FROM_RECIPE})"
    for name in list(names):
        if name.startswith("--") and "_" in name and name.replace("_", "-") not in names:
            names.append(name.replace("_", "-"))
    help_text = kwargs.get("help")
    if help_text is not None and help_text != argparse.SUPPRESS and "default" not in help_text:
        default = kwargs.get("default")
        if not (kwargs.get("action") in ("store_true", "store_false") or default in (None, argparse.SUPPRESS)):
            kwargs["help"] = f"{help_text} (default: {default})"
    return names, kwargs


class Parser(argparse.ArgumentParser):
    """argparse with the shared flags' meanings (`shared=True`), per-dataset recipes (`recipes=`, `recipe=True`), the
    dashed spelling of every `--snake_case` flag, and defaults shown in --help."""

    def __init__(self, *args, recipes=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        self.recipes, self.recipe_flags = recipes, set()
        if recipes:
            kwargs["epilog"] = recipe_table(recipes) + ("\n\n" + kwargs["epilog"] if kwargs.get("epilog") else "")
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        names, kwargs = _spellings(names, kwargs, self)
        return super().add_argument(*names, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        plain = group.add_argument

        def add_argument(*names, **kw):
            names, kw = _spellings(names, kw, self)
            return plain(*names, **kw)
        group.add_argument = add_argument
        return group

    def error(self, message):
        # One line and exit 2, like every other bad input.
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if self.recipes:
            missing = {f for r in self.recipes.values() for f in self.recipe_flags - set(r)}
            unknown = {f for r in self.recipes.values() for f in set(r) - self.recipe_flags}
            if missing or unknown:  # a programming error: every recipe sets every recipe flag, and nothing else
                raise ValueError(f"recipe table: missing {sorted(missing)}, not recipe flags {sorted(unknown)}")
        return parsed


def recipe_table(recipes):
    """The recipes as --help shows them: one row per flag, one column per recipe."""
    names = list(recipes)
    flags = list(dict.fromkeys(f for r in recipes.values() for f in r))
    cells = [["--" + f] + [_show(recipes[n][f]) for n in names] for f in flags]
    header = ["recipe"] + names
    widths = [max(len(str(row[i])) for row in [header] + cells) for i in range(len(header))]
    line = lambda row: "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join(["recipes (--recipe; a flag given on the command line wins):", line(header)]
                     + [line(row) for row in cells])


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def apply_recipe(args, parser_or_recipes, name):
    """Fill every recipe flag left at None with the recipe's value; the explicit flags stay. Records args.recipe."""
    recipes = getattr(parser_or_recipes, "recipes", parser_or_recipes)
    if name not in recipes:
        raise UserError(f"unknown recipe {name!r}: choose one of {', '.join(recipes)}")
    for flag, value in recipes[name].items():
        if getattr(args, flag) is None:
            setattr(args, flag, list(value) if isinstance(value, (list, tuple)) else value)
    args.recipe = name
    return args


def add_standard_flags(parser):
    """The run-plumbing flags every script shares, with the same meaning everywhere."""
    g = parser.add_argument_group("run")
    g.add_argument("--logdir", default="runs", help="folder that holds one sub-folder per run")
    g.add_argument("--run_name", default=None,
                   help="name of this run's folder (default: <method>-<dataset>-<labels>-s<seed>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint: 'auto' (or no value) takes the run folder's checkpoint.pt")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision for forward passes")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the networks")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic kernels (slower); with --workers 0 on CPU a resumed run equals an uninterrupted one")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: on when stdout is a terminal, else a log line every 30 s)")
    g.add_argument("--trust_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="load checkpoints that hold Python objects (weights_only=False); only for files you trust")
    return parser


def entry(main):
    """Run `main()`; bad input becomes one line on stderr and exit code 2 instead of a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()


# ------------------------------------------------------------------------------------------- devices, seeds, precision

def seed_everything(seed, rank=0, deterministic=False):
    """Seed every RNG; ranks get different streams (augmentation) but must derive shared choices from `seed` alone."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states():
    """Every rank's RNG states, in rank order (each rank draws its own augmentations): a checkpoint's "rng"."""
    state = rng_state()
    if not distributed.is_distributed():
        return [state]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, state)
    return out


def restore_rng_states(states, rank, reseed):
    """This rank's RNG states from a checkpoint's `rng_states()`; saved by another number of processes, the
    streams are started afresh by `reseed()` (reproducible, but not the uninterrupted run's)."""
    if isinstance(states, (list, tuple)) and len(states) == (torch.distributed.get_world_size()
                                                             if distributed.is_distributed() else 1):
        set_rng_state(states[rank])
    else:
        reseed()


def restore(state, parts, fits="this command"):
    """Load a checkpoint's entries into a resumed run's objects (key -> module, optimizer, scaler, stream, or a tensor
    to copy into): an entry that does not fit is one line naming it and what it must fit, not a traceback."""
    for key, obj in parts.items():
        try:
            if isinstance(obj, torch.Tensor):
                if tuple(state[key].shape) != tuple(obj.shape):
                    raise ValueError(f"shape {tuple(state[key].shape)}, here {tuple(obj.shape)}")
                obj.copy_(state[key])
            else:
                obj.load_state_dict(state[key])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"the checkpoint's {key} does not fit {fits} ({' '.join(str(e).split())[:300]}): "
                            "resume with the flags of that run, or pass --run_name NAME to start a new run") from None


def _tuples(x):
    # RNG states come back from a weights-only load with lists where tuples were.
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def autocast(device, amp):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device, amp):
    # bf16 keeps fp32's exponent range and needs no loss scaling; fp16 does.
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")


class Means:
    """A training loop's running means, summed where they are computed: `add(**values)` every iteration reads
    nothing back from the device; `read()`, at a logging step, returns Python floats (one host read, averaged over
    the ranks, which must all call it) and starts a new interval."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, **values):
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n += 1

    def read(self):
        if not self.n:
            return {}
        order, tensors = list(self.sums), [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        out = {k: v / self.n for k, v in self.sums.items() if k not in tensors}
        if tensors:
            device = self.sums[tensors[0]].device
            means = torch.stack([self.sums[k].to(device).reshape(()) for k in tensors]) / self.n
            out.update(zip(tensors, distributed.all_reduce_mean(means).tolist()))
        self.sums, self.n = {}, 0
        return {k: out[k] for k in order}


def check_finite(loss, step, run):
    value = float(loss)
    if not math.isfinite(value):
        kept = f"the last good checkpoint is kept in {run.path('checkpoint.pt')}" if run.path("checkpoint.pt").exists() \
            else "no checkpoint was written yet"
        raise UserError(f"the loss is {value} at iteration {step}: training stopped; {kept}. "
                        "Lower --lr or turn --amp off, then --resume")


# ----------------------------------------------------------------------------------------------------------- evaluation
def accuracy(logits, targets, topk=(1, 5)):
    """Top-k accuracies in percent (k is capped at the number of classes)."""
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    return [100.0 * hit[:, :min(k, logits.shape[1])].any(1).float().mean().item() for k in topk]


@torch.no_grad()
def evaluate(forward, loader, device):
    """Top-1 and top-5 of `forward(images) -> logits` over a loader of (x, y, idx), summed over ranks."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = forward(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y.view(-1, 1))
        counts += torch.tensor([hit[:, :1].any(1).sum().item(), hit.any(1).sum().item(), len(y)],
                               dtype=torch.float64, device=device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(counts)
    return (100.0 * counts[0] / counts[2]).item(), (100.0 * counts[1] / counts[2]).item()


# ----------------------------------------------------------------------------------------------------------- run folder
def _versions():
    from importlib import metadata

    def installed(*dists):  # read the package metadata: importing DALI or faiss just for this costs seconds
        for d in dists:
            try:
                return metadata.version(d)
            except metadata.PackageNotFoundError:
                pass
        return None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "numpy": np.__version__, "torchvision": installed("torchvision"),
            "dali": installed("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
            "faiss": installed("faiss-gpu", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11")}


class Run:
    """The run folder of the contract. Every rank builds one; only the main rank writes.

    Building it writes nothing: it finds the folder and, when resuming, loads the checkpoint and checks it against
    the command (the script that wrote it, the flags in `fixed`). The script then makes its own checks (the split,
    the weights) and calls `start()`, which writes args.json and opens the logs; so a refused command leaves the
    folder byte for byte as it was. `kept` names the flags whose checkpoint value wins on resume (the optimizer's
    state holds them): a changed one is reported in one line."""

    RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl", "args.json")

    def __init__(self, args, method, dataset, labels, dist=None, fixed=(), kept=()):
        self.args = args
        self.is_main = dist.is_main if dist is not None else True
        self.script = method.split("-")[0]  # selftuning-ft is selftuning.py's baseline
        self.name = args.run_name or f"{method}-{dataset}-{labels}-s{args.seed}"
        self.dir = Path(args.logdir) / self.name
        self.method = method
        self.flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.fixed, self.kept = tuple(fixed), tuple(kept)
        self.evals = []
        self.wall_before = 0.0
        self.start_time = time.time()
        self.started = False
        self.resume_state = self._resume_state(args)
        if self.resume_state is not None:
            saved = self.resume_state.get("run", {})
            self.evals, self.wall_before = list(saved.get("evals", [])), float(saved.get("wall_s", 0.0))
        self.writer = None
        self._bar = None
        self._last_line = (None, None)
        self._rate = (None, None)

    def _resume_state(self, args):
        ckpt = self.dir / "checkpoint.pt"
        if args.resume is None:
            # the main rank decides: the others may look after it has started writing
            held = [f for f in self.RUN_FILES if (self.dir / f).exists()] if self.is_main else []
            if held:
                raise UserError(f"{self.dir} already holds a run ({', '.join(held)}): pass --resume auto to continue "
                                "it, or --run_name NAME to start a new one")
            return None
        path = ckpt if args.resume == "auto" else Path(args.resume)
        if not path.exists():
            if args.resume == "auto":
                return None  # nothing to continue yet: start the run
            raise UserError(f"--resume {path}: no such checkpoint file")
        state = load_file(path, trust=args.trust_checkpoint)
        wrote = state.get("script") if isinstance(state, dict) else None
        if wrote != self.script:
            who = f"was written by {wrote}.py" if wrote else "is not a checkpoint of these scripts (it names no script)"
            raise UserError(f"{path} {who}; this is {self.script}.py: resume with the script that wrote it, or pass "
                            "--run_name NAME to start a new run")
        saved = state.get("flags", {})
        changed = [f for f in self.fixed if saved.get(f) != self.flags.get(f)]
        if changed:
            raise UserError(f"the checkpoint {path} was made with {_flag_list(saved, changed)}; this command asks "
                            f"for {_flag_list(self.flags, changed)}: resume with the same flags, or pass --run_name "
                            "NAME to start a new run")
        return state

    def start(self):
        """Write args.json, metrics.jsonl (the evaluations the checkpoint holds; none on a fresh start, so a run cut
        off before its first checkpoint leaves no duplicates) and open TensorBoard; remove temporary files of writes
        that were killed."""
        self.started = True
        if not self.is_main:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(self.dir)
        self.save_json("args.json", {"method": self.method, "argv": sys.argv, "flags": self.flags,
                                     "versions": _versions()})
        self._rewrite_metrics()
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(self.dir))
        table = "|flag|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in sorted(self.flags.items()))
        self.writer.add_text("hyperparameters", table)
        if self.resume_state is not None:
            saved = self.resume_state.get("flags", {})
            kept = [f for f in self.kept if f in saved and saved[f] != self.flags.get(f)]
            if kept:
                print(f"[{self.name}] resuming keeps the checkpoint's {_flag_list(saved, kept)} (asked: "
                      f"{_flag_list(self.flags, kept)}); start a new --run_name to change them", flush=True)
        return self

    def path(self, name):
        return self.dir / name

    # logging
    def _check_started(self):
        if not self.started:
            raise RuntimeError("Run.start() must come before anything is written to the run folder")

    def log(self, step, scalars):
        self._check_started()
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, float(v), step)

    def log_eval(self, step, top1, top5=None, **extra):
        record = {"iter": int(step), "top1": float(top1), "top5": None if top5 is None else float(top5),
                  "wall_s": round(self.wall_s(), 2), **extra}
        self.evals.append(record)
        if self.is_main:
            self.log(step, {"test/top1": top1, **({"test/top5": top5} if top5 is not None else {})})
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self._print(f"[{self.name}] iter {step}: top1 {top1:.2f}" + (f" top5 {top5:.2f}" if top5 is not None else ""))

    def _rewrite_metrics(self):
        # Evaluations logged after the checkpoint we resume from happened in a run that was cut off: drop them.
        with open(self.dir / "metrics.jsonl", "w") as f:
            for record in self.evals:
                f.write(json.dumps(record) + "\n")

    def progress(self, step, total, **values):
        """Report iteration `step` of `total`: a tqdm bar on a terminal, else a line every 30 s with it/s and ETA, as
        the bar shows them; logs time/iter_per_s to tensorboard every 50 iterations."""
        if not self.is_main:
            return
        now = time.time()
        t0, s0 = self._rate
        if t0 is None or step < s0:  # the first call, or a later stage numbering its iterations afresh
            self._rate = (now, step)
        elif step - s0 >= 50 or step == total:
            if now > t0:
                self.log(step, {"time/iter_per_s": (step - s0) / (now - t0)})
            self._rate = (now, step)
        show = self.args.progress if self.args.progress is not None else sys.stdout.isatty()
        values = {k: v for k, v in values.items() if v is not None}  # e.g. a loop's means before its first read
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        if show:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=total, initial=step - 1, dynamic_ncols=True, desc=self.name)
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=False)
            return
        t_line, s_line = self._last_line
        fresh = t_line is None or step < s_line
        if fresh or now - t_line >= 30 or step == total:
            rate = (step - s_line) / (now - t_line) if not fresh and now > t_line else None  # since the last line
            speed = f"{rate:.3g} it/s, ETA {_clock((total - step) / rate)}" if rate else "- it/s, ETA -"
            self._last_line = (now, step)
            print(f"[{self.name}] iter {step}/{total} {text + ' ' if text else ''}| {speed}", flush=True)

    def _print(self, line):
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    # files
    def wall_s(self):
        return self.wall_before + time.time() - self.start_time

    def save_json(self, name, obj):
        self._check_started()
        if self.is_main:
            atomic_write(self.dir / name, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))

    def save_split(self, indices, ids):
        """labeled.csv: the labeled training images as `Index,ImageID` rows (positions in the training set, in the
        format every labeled-index flag reads, so a split can be reused as it is)."""
        self._check_started()
        if self.is_main:
            rows = "".join(f"{int(i)},{name}\n" for i, name in zip(indices, ids))
            atomic_write(self.dir / "labeled.csv", lambda f: f.write(("Index,ImageID\n" + rows).encode()))

    def save_checkpoint(self, state):
        """Write checkpoint.pt atomically (a temporary file, then rename): a crash never leaves half a checkpoint."""
        self._check_started()
        if self.is_main:
            state = _loadable({**state, "script": self.script, "flags": self.flags,
                               "run": {"evals": self.evals, "wall_s": self.wall_s()}})
            atomic_write(self.dir / "checkpoint.pt", lambda f: torch.save(state, f))

    def stop(self, step, total):
        """End a run that --stop_after cut short: its checkpoint is written and no summary.json, so the run folder
        reads as unfinished and --resume auto continues it with the same schedule."""
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.is_main:
            print(f"[{self.name}] stopped after iteration {step} of {total} (--stop_after); continue with --resume "
                  "auto", flush=True)

    def finish(self, **figures):
        """Write summary.json: final, best and median-of-last-5 top-1, iterations (by default those of the last
        evaluation), wall time, plus the method's own figures."""
        top1 = [e["top1"] for e in self.evals]
        summary = {"final_top1": top1[-1] if top1 else None, "best_top1": max(top1) if top1 else None,
                   "median_last_top1": statistics.median(top1[-5:]) if top1 else None,
                   "final_top5": self.evals[-1]["top5"] if top1 else None, "evals": len(top1),
                   "iters": self.evals[-1].get("iter") if top1 else None, "wall_s": round(self.wall_s(), 2),
                   **figures}
        self.save_json("summary.json", summary)
        if self._bar is not None:
            self._bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.is_main:
            shown = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
            print(f"[{self.name}] done: " + json.dumps(shown, default=str), flush=True)
        return summary


def _clock(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _flag_list(flags, names):
    return " ".join(f"--{n} {flags.get(n)}" for n in names)


def _remove_stale_temporaries(folder):
    """Temporary files of atomic writes whose process is gone (killed mid-write): `.<name>.tmp<PID>`."""
    for tmp in folder.glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _loadable(x):
    """NumPy values become tensors / Python numbers, so the checkpoint loads with weights_only=True."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _loadable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_loadable(v) for v in x)
    return x


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_file(path, trust=False):
    """The one checkpoint loader: torch.load on CPU, weights only unless the user vouches for the file (no code runs
    from a checkpoint otherwise); a dict, or one line saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:
        hint = "" if trust else " (if this is a trusted file that holds Python objects, add --trust_checkpoint)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}{hint}") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj
