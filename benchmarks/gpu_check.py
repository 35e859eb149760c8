"""Every GPU path of the six scripts in one command: short runs on tiny synthetic data, one table.

    python benchmarks/gpu_check.py                      # on a CUDA machine (all visible GPUs for torchrun)
    python benchmarks/gpu_check.py --cpu                # the same table on CPU (what the tests run)
    python benchmarks/gpu_check.py --only 'dali|^usl ' --timeout 120 --keep /tmp/gpu_check
    python benchmarks/gpu_check.py --list               # the rows, without running them

It writes small data sets in the formats the scripts read (tests/fakedata.py: JPEG image folders with index CSVs,
the Self-Tuning fine-grained layout; MXNet RecordIO packed by common.dali.pack_recordio; a MoCo-format checkpoint)
to a temporary folder, then runs each script once per GPU path it has: a subprocess with a timeout (--timeout),
ResNet-18 on 32-px images for --iters training iterations (30 on CUDA, 3 on CPU), always with an explicit --device.

    faiss ...           the script's plain run (no amp), which searches with faiss: usl.py (kNN density, k-means),
                        metric_transfer.py (kNN graph) and usl_t.py (neighbour mining, density) put their indexes
                        on the GPU by themselves when they run on CUDA, and the row fails if faiss saw no GPU
    amp bf16, amp fp16  --amp: autocast in bf16, or in fp16 with a GradScaler on CUDA
    compile             --compile (torch.compile): debiaspl.py and usl_t.py on CUDA; on CPU usl_t.py only, whose
                        heads-only step compiles fastest (C++ code generation takes minutes per script there)
    dali folder         --dali from JPEG folders: nvJPEG decoding (DALI device 'mixed') and augmentation on the GPU
    dali recordio       --dali from .rec/.idx (metasemi.py, the one script that reads RecordIO)
    torchrun xN         torchrun over every visible GPU, NCCL (one GPU: one rank, no process group); on CPU 2
                        processes over gloo. --batch_size is global in every script: it grows with the ranks

On CUDA that is 28 runs, on CPU 27 (`--list` prints them).

Columns:
    rate      it/s = training iterations / the run's wall time, both as the run folder records them (summary.json
              `iters` and `wall_s`; metric_transfer.py adds its pretraining iterations from metrics.jsonl). The
              wall time spans the whole run (data set-up, evaluations, compilation), so short runs understate the
              step rate: compare rows of one script. usl.py does not train: img/s = images embedded per second of
              its feature pass (summary.json `dataset_size` / `features_s`).
    peak MiB  on CUDA torch.cuda.max_memory_allocated() (PyTorch's allocator; DALI's and faiss' own GPU memory are
              not counted), on CPU the peak resident set (getrusage ru_maxrss); the largest over the run's
              processes. Each process reports it at exit through a sitecustomize.py on the child's PYTHONPATH.
    result    PASS, or FAIL and the first error line of the run (its `error:` line or exception).

Without a CUDA device and without --cpu it says so in one line and exits 0. The exit status is 1 when a path failed.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # fakedata.py: the writers of tiny data sets in the real formats

SCRIPTS = ["selftuning", "debiaspl", "metric_transfer", "usl", "usl_t", "metasemi"]
DALI = {"debiaspl", "metric_transfer", "usl", "metasemi"}          # the scripts with --dali
FAISS = {"usl": "faiss knn+kmeans", "metric_transfer": "faiss knn graph", "usl_t": "faiss knn"}
BATCH = {"selftuning": 4, "debiaspl": 4, "metric_transfer": 8, "usl": 8, "usl_t": 6, "metasemi": 4}  # per process
CLASSES = 3

# Imported by every Python process of a checked run (the launcher and the ranks of torchrun too): at exit it appends
# the process's peak memory to the file named by GPU_CHECK_PEAK. Only a process that used CUDA asks torch about it.
PEAK_HOOK = '''\
import atexit, json, os, resource, sys


def _report():
    rec = {"pid": os.getpid(), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        rec["cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        rec["faiss_gpus"] = faiss.get_num_gpus()
    with open(os.environ["GPU_CHECK_PEAK"], "a") as f:
        f.write(json.dumps(rec) + "\\n")


if os.environ.get("GPU_CHECK_PEAK"):
    atexit.register(_report)
'''


@dataclass
class Row:
    script: str
    path: str
    flags: dict = field(default_factory=dict)  # over the script's base flags: None drops one, True is a switch
    root: str = None                            # another data folder for --root
    torchrun: int = 0                           # > 0: under torchrun with this many processes
    faiss_gpu: bool = False                     # on CUDA the run's faiss must have seen a GPU

    @property
    def name(self):
        return f"{self.script} {self.path}"

    @property
    def slug(self):
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


# ------------------------------------------------------------------------------------------------------------ data
def write_data(d):
    """The data sets every row reads, under d; returns d."""
    import fakedata
    import torch
    from common import backbones
    from common.dali import pack_recordio

    folder = fakedata.write_imagefolder(d / "folder", num_classes=CLASSES, per_class_train=16, per_class_val=2,
                                        size=40)
    fakedata.write_finegrained(d, "StanfordCars", num_classes=4, per_class_train=8, per_class_test=2, size=40)
    # metasemi's RecordIO root: train_label / train_unlabel / val, 2 labeled images per class
    wnids = fakedata.wnids(CLASSES)
    for w in wnids:
        for i, f in enumerate(sorted((folder / "train" / w).iterdir())):
            part = d / "rec_src" / ("labeled" if i < 2 else "unlabeled") / w
            part.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, part / f.name)
    for src, prefix in (("rec_src/labeled", "train_label"), ("rec_src/unlabeled", "train_unlabel"),
                        ("folder/val", "val")):
        pack_recordio(d / src, d / "rec" / prefix, classes=wnids)
    # usl.py and usl_t.py embed with a self-supervised checkpoint: MoCo's layout, with its fc.0/fc.2 projection head
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random stream is left as it was
        torch.manual_seed(0)
        state = {f"module.encoder_q.{k}": v for k, v in backbones.build("resnet18").state_dict().items()}
        state.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512) * 0.05,
                      "module.encoder_q.fc.0.bias": torch.zeros(512),
                      "module.encoder_q.fc.2.weight": torch.randn(128, 512) * 0.05,
                      "module.encoder_q.fc.2.bias": torch.zeros(128)})
    torch.save({"state_dict": state}, d / "moco.pth.tar")
    return d


def base_flags(script, d, iters, batch):
    """A short run of `script` on the data of write_data: resnet18 at 32 px, `iters` training iterations."""
    net = {"--backbone": "resnet18", "--workers": 0}
    if script == "selftuning":
        return {"--root": d / "StanfordCars", "--label_ratio": 15, **net, "--image_size": 32, "--batch_size": batch,
                "--queue_size": 8, "--projector_dim": 16, "--max_iter": iters, "--eval_interval": iters}
    if script == "debiaspl":
        return {"--root": d / "folder", "--trainindex_x": "train_1p_index.csv", "--trainindex_u":
                "train_99p_index.csv", **net, "--image_size": 32, "--batch_size": batch, "--mu": 2, "--eman": True,
                "--CLDLoss": True, "--max_iter": iters, "--eval_interval": iters}
    if script == "metric_transfer":  # all three stages: pretraining and fine-tuning take `iters` iterations each
        return {"--root": d / "folder", "--dataset": "imagefolder", **net, "--image_size": 32, "--num_labeled": 6,
                "--nce_k": 8, "--batch_size": batch, "--max_iter": iters, "--pseudo_ratio": 0.5}
    if script == "usl":
        return {"--root": d / "folder", "--dataset": "imagefolder", "--pretrained": d / "moco.pth.tar", **net,
                "--image_size": 32, "--batch_size": batch, "--budget": 4, "--knn_k": 3, "--kmeans_iters": 10}
    if script == "usl_t":
        return {"--root": d / "folder", "--dataset": "imagefolder", "--pretrained": d / "moco.pth.tar", **net,
                "--image_size": 32, "--batch_size": batch, "--budget": 3, "--num_clusters": 5, "--num_neighbors": 2,
                "--knn_k": 3, "--pseudo_per_cluster": 2, "--reassign_after_steps": 0, "--max_iter": iters,
                "--eval_interval": iters}
    if script == "metasemi":
        return {"--root": d / "folder", "--dataset": "imagefolder", "--backbone": "resnet18", "--workers": 0,
                "--imcrop": 32, "--num_labeled": 2 * CLASSES, "--batch_size": batch, "--epochs": 10, "--warmup": 1,
                "--max_iter": iters, "--eval_interval": iters}
    raise ValueError(script)


def to_argv(flags):
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(k)
        elif v is not None and v is not False:
            argv += [k, str(v)]
    return argv


# ------------------------------------------------------------------------------------------------------------- rows
def plan(gpu, world):
    """The rows in table order: per script its faiss run, amp, compile, DALI and torchrun paths."""
    if world > 1:
        torchrun = f"torchrun x{world} {'nccl' if gpu else 'gloo'}"
    else:
        torchrun = "torchrun x1 (one GPU: no NCCL)"  # NCCL takes one GPU per rank: one rank joins no process group
    # compile takes minutes per script on CPU (C++ code generation): there only the smallest, usl_t's heads-only step
    compiled = {"debiaspl", "usl_t"} if gpu else {"usl_t"}
    dali = {"--dali": True, "--workers": 2}  # DALI threads
    rows = []
    for s in SCRIPTS:
        if s in FAISS:
            rows.append(Row(s, FAISS[s], faiss_gpu=True))
        rows += [Row(s, "amp bf16", {"--amp": "bf16"}), Row(s, "amp fp16", {"--amp": "fp16"})]
        if s in compiled:
            rows.append(Row(s, "compile", {"--compile": True}))
        if s in DALI:
            rows.append(Row(s, "dali folder", dali))
        if s == "metasemi":  # the labeled / unlabeled split is the files' own
            rows.append(Row(s, "dali recordio", {**dali, "--dataset": None, "--num_labeled": None}, root="rec"))
        rows.append(Row(s, torchrun, torchrun=world))
    return rows


def command(row, d, iters, device):
    # --batch_size is global in every script: the same per-process batch on any number of ranks
    flags = {**base_flags(row.script, d, iters, BATCH[row.script] * max(row.torchrun, 1)), **row.flags}
    if row.root:
        flags["--root"] = d / row.root
    # an explicit --device: a broken CUDA set-up fails the row instead of falling back to the CPU
    flags.update({"--device": device, "--logdir": d / "runs", "--run_name": row.slug})
    launcher = [sys.executable]
    if row.torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row.torchrun}"]
    return launcher + [str(REPO / f"{row.script}.py")] + to_argv(flags)


# ---------------------------------------------------------------------------------------------------------- running
ERROR_LINE = re.compile(r"(?:\[(?:rank|default)\d*\]:\s*)?(error: .*|[A-Za-z_][\w.]*(?:Error|Exception)\b.*)")


def first_error(*texts):
    """The first `error: ...` or exception line of a run's output; else its last line."""
    for text in texts:
        for line in text.splitlines():
            m = ERROR_LINE.fullmatch(line.strip())
            if m:
                return m.group(1)
    for text in texts:
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        if lines:
            return lines[-1]
    return "no output"


def run_child(cmd, cwd, env, timeout, log):
    """(exit code or None on timeout, stdout, stderr). The child leads its own process group, so a timeout ends
    torchrun's ranks along with it."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(p.pid, sig)  # also the group's leftovers after a normal exit
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
    return code, log.with_suffix(".out").read_text(errors="replace"), log.with_suffix(".err").read_text(
        errors="replace")


def rate(script, run_dir):
    """(value, unit) from the run folder; see the module docstring."""
    s = json.loads((run_dir / "summary.json").read_text())
    if script == "usl":
        return (s["dataset_size"] / s["features_s"] if s.get("features_s") else None), "img/s"
    iters = s.get("iters") or 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():  # metric_transfer: summary.json counts the fine-tuning iterations only
        stages = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        iters += max([r["iter"] for r in stages if r.get("stage") == "pretrain"], default=0)
    return (iters / s["wall_s"] if s.get("wall_s") else None), "it/s"


def peaks(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def check(row, d, args, gpu, env):
    """Run one row; a dict with its table cells."""
    run_dir = d / "runs" / row.slug
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept folder from an earlier check: start afresh
    peak_file = d / "logs" / f"{row.slug}.peak"
    peak_file.unlink(missing_ok=True)
    cmd = command(row, d, args.iters, "cuda" if gpu else "cpu") + shlex.split(args.extra)
    t0 = time.time()
    code, out, err = run_child(cmd, d, {**env, "GPU_CHECK_PEAK": str(peak_file)}, args.timeout,
                               d / "logs" / row.slug)
    res = {"row": row, "cmd": cmd, "wall": time.time() - t0, "rate": None, "unit": "", "peak": None}
    reports = peaks(peak_file)
    key = "cuda_mib" if gpu else "rss_mib"
    res["peak"] = max((r[key] for r in reports if key in r), default=None)
    if code is None:
        res["result"] = f"FAIL: timed out after {args.timeout:g} s"
    elif code != 0:
        res["result"] = f"FAIL: {first_error(err, out)}"
    elif not (run_dir / "summary.json").exists():
        res["result"] = f"FAIL: exit 0 but no {run_dir.relative_to(d)}/summary.json"
    elif gpu and row.faiss_gpu and not any(r.get("faiss_gpus", 0) > 0 for r in reports):
        res["result"] = "FAIL: faiss saw no GPU (faiss.get_num_gpus() == 0): the CPU index ran"
    else:
        res["rate"], res["unit"] = rate(row.script, run_dir)
        res["result"] = "PASS"
    return res


def child_env(d, cpu):
    hook = d / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(PEAK_HOOK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), str(REPO), env.get("PYTHONPATH")) if p)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # also keeps faiss (metric_transfer asks it directly) and DALI off a GPU
        # one thread per process: the two torchrun ranks do not fight over the cores, rows stay comparable
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------------------------------------------------ table
def table(results, gpu):
    head = ["script", "path", "rate", "peak GPU MiB" if gpu else "peak RSS MiB", "wall s", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rate_cell = f"{r['rate']:.3g} {r['unit']}" if r["rate"] is not None else "-"
        peak_cell = f"{r['peak']:.0f}" if r["peak"] is not None else "-"
        cells = [r["row"].script, r["row"].path, rate_cell, peak_cell, f"{r['wall']:.1f}", r["result"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def regex(text):
    try:
        return re.compile(text)
    except re.error as e:  # not a ValueError: argparse would let it through as a traceback
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run the table on CPU (CUDA hidden from the runs)")
    p.add_argument("--only", type=regex, default=None, metavar="REGEX",
                   help="rows whose 'script path' matches (re.search), e.g. 'dali', '^usl ', 'amp fp16'")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is ended (default: 300)")
    p.add_argument("--iters", type=int, default=None,
                   help="training iterations per run (default: 30 on CUDA, 3 on CPU)")
    p.add_argument("--extra", default="", metavar="FLAGS",
                   help="flags appended to every selected run, e.g. --extra='--batch_size 16'")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="write data, run folders and logs to DIR and keep them (default: a temporary folder)")
    p.add_argument("--list", action="store_true", help="print the selected rows and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): nothing to check; "
              "--cpu runs the same table on CPU")
        return 0
    world = torch.cuda.device_count() if gpu else 2
    args.iters = args.iters or (30 if gpu else 3)
    rows = plan(gpu, world)
    if args.only:
        rows = [r for r in rows if args.only.search(r.name)]
    if not rows:
        print(f"gpu_check: no row matches --only {args.only.pattern!r}; --list shows them", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(r.name for r in rows))
        return 0

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        d = Path(args.keep).resolve() if args.keep else Path(tmp)
        (d / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        write_data(d)
        env = child_env(d, args.cpu)
        # no device name: asking for it would give this process a CUDA context for the whole check (and, on a GPU
        # in exclusive-process mode, lock the runs out)
        where = "CPU" if args.cpu else f"{world} GPU(s)"
        print(f"gpu_check: {len(rows)} paths on {where}, {args.iters} iterations each, data in {d}", flush=True)
        results = []
        for i, row in enumerate(rows, 1):
            print(f"[{i}/{len(rows)}] {row.name} ...", end=" ", flush=True)
            results.append(check(row, d, args, gpu, env))
            print(f"{results[-1]['result']} ({results[-1]['wall']:.1f} s)", flush=True)
        failed = [r for r in results if r["result"] != "PASS"]
        print()
        print(table(results, gpu))
        print(f"\n{len(results) - len(failed)} of {len(results)} paths passed in {time.time() - t0:.0f} s "
              f"(rate and peak memory: see the docstring of benchmarks/gpu_check.py)")
        for r in failed:
            prefix = "CUDA_VISIBLE_DEVICES= " if args.cpu else ""
            print(f"failed: {r['row'].name}: {prefix}{shlex.join(r['cmd'])}")
        if failed:
            print(f"logs: {d / 'logs'}" if args.keep else "rerun with --keep DIR to keep the data, runs and logs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
