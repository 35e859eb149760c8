"""Tables and curves from run folders, and the published numbers to compare them with.

    python -m common.report RUNS_DIR [RUNS_DIR ...]            # markdown table of every group of runs
    python -m common.report runs --paper                        # ... with the published number and the difference
    python -m common.report runs --csv runs.csv --plot top1.png # ... also as CSV, and top-1 against iteration
    python -m common.report --published [RUNS_DIR ...]          # the published numbers, with this code's beside them
    python -m common.report --published --write_docs docs runs  # ... written into the tables of docs/*.md

Every folder under RUNS_DIR that holds an `args.json` is a run (see common/run.py); one without `summary.json` is
unfinished and shows its last evaluation. Runs whose flags differ only in `--seed` and in PLUMBING form a group: one
row with the mean ± sample standard deviation over its finished runs of the final top-1, the median of the last 5
evaluations and the best evaluation (selected on the test set, so optimistic). The `flags` column lists the flags in
which the groups of one method and dataset differ.

Label selections (usl.py, usl_t.py) get their own table: budget, class coverage, and the final top-1 of the training
runs whose labeled-index flag (LABELED_INDEX_FLAGS) names a file of the selection's folder. Such a training run's
labels read `<selection method>:<budget>`, and runs trained on the picks of different selection seeds are seeds of one
group.

The published numbers live in common/published.csv, one number per line with its source. `--paper` takes the first
line whose script, dataset and labels equal the group's, whose backbone (if given) equals it, and whose flags
(`name=value`, space-separated) the group's runs have; error rates are compared as 100 - error.

`--published` prints one table per table of the file, with a `this code` column: the final top-1 of the groups
`--paper` matches to a line of the row or to another line of the same setting (as an error where the line is one),
`not run (needs GPUs)` where no run folder does, `–` where the row is not a setting of this code. `--write_docs
FOLDER` puts each method's tables between the lines `<!-- published:METHOD -->` and `<!-- /published -->` of
FOLDER/*.md, leaving the rest of the files as they are.
"""
import csv
import json
import re
import statistics
from pathlib import Path

from common import UserError, datasets
from common import run as runlib

PUBLISHED = Path(__file__).with_name("published.csv")

# Flags that decide where files go, how fast, how verbosely or in how many steps a run goes, never what it computes.
# `root` is where the data lives (the dataset column says which data); `stage` is the last stage metric_transfer ran
# in the folder, which can run its stages one call at a time.
PLUMBING = ("logdir", "run_name", "resume", "stop_after", "device", "workers", "progress", "trust_checkpoint",
            "compile", "deterministic", "print_freq", "log_interval", "save_interval", "local_rank", "download", "root",
            "stage", "cache_dir", "recompute_all", "recompute_num_dep", "grid_per_class", "eval_batch_size",
            "test_batch_size", "plot_features")
SELECTION_METHODS = ("usl", "usl_t")
LABELED_INDEX_FLAGS = ("trainindex_x", "labeled_file")  # debiaspl.py, metric_transfer.py
# Summarised by the dataset, backbone and labels columns, so not repeated in the flags column.
SHOWN = ("dataset", "backbone", "arch", *LABELED_INDEX_FLAGS, "num_labeled", "num_label", "label_ratio", "anno_percent",
         "budget", "selection", "zero_shot")
TOP1 = ("top1", "top1_error")  # the metrics a run's final top-1 is compared with
METRICS = {"top1": "top-1", "top1_error": "top-1 error", "top5_error": "top-5 error", "top1_gain": "gain",
           "pseudo_label_acc": "pseudo-label accuracy", "knn_top1": "kNN top-1"}


# ------------------------------------------------------------------------------------------------------------ reading
def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None


class RunFolder:
    """A run folder: its flags, its test evaluations and, once it has finished, its summary."""

    def __init__(self, folder):
        args = read_json(folder / "args.json")
        if not isinstance(args, dict) or not isinstance(args.get("flags"), dict) or "method" not in args:
            raise UserError(f"{folder / 'args.json'}: no method and flags in it, not the args.json of a run")
        self.dir, self.name, self.method, self.flags = folder, folder.name, args["method"], args["flags"]
        self.summary = read_json(folder / "summary.json") if (folder / "summary.json").exists() else None
        self.evals = []
        path = folder / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        for n, line in enumerate(lines, 1):
            try:
                e = json.loads(line) if line.strip() else None
            except ValueError as err:
                raise UserError(f"{path} line {n}: malformed JSON ({err})") from None
            # metric_transfer's pretraining lines hold a kNN monitor that uses every train label: not a test top-1
            if e is not None and e.get("stage", "finetune") == "finetune":
                self.evals.append(e)
        self.dataset = self.flags.get("dataset") or dataset_from_root(self.flags.get("root"))
        self.backbone = self.flags.get("backbone") or self.flags.get("arch")
        self.selection = self.labels = self.setting = None  # set by group_runs


def dataset_from_root(root):
    try:
        return datasets.infer_name(root)  # what the script did when --dataset was left out
    except UserError:
        return Path(root).name if root else "?"


def find_runs(dirs):
    runs = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d}: no such folder")
        folders = sorted(p.parent for p in d.rglob("args.json"))
        if not folders:
            raise UserError(f"{d}: no run folders in it (a run folder holds args.json)")
        runs += [RunFolder(f) for f in folders]
    return runs


# ----------------------------------------------------------------------------------------------------------- grouping
def selection_of(value, selections):
    """The selection run whose folder holds the file `value` names. args.json keeps paths as they were typed, relative
    to wherever the run started, so a path that does not resolve to a known folder is matched by its folder's name."""
    if not isinstance(value, str) or not value:
        return None
    parent = Path(value).parent
    return selections.get(str(parent.resolve())) or selections.get(parent.name)


def labels(run):
    f = run.flags
    if run.method in SELECTION_METHODS:
        return f"{f['budget']}-random" if f.get("selection") == "random" else str(f["budget"])
    if run.selection is not None:
        return f"{run.selection.method}:{run.selection.labels}"
    if f.get("zero_shot"):
        return "zero-shot"
    for flag in LABELED_INDEX_FLAGS:
        if f.get(flag):
            stem = Path(f[flag]).stem
            share = re.fullmatch(r"train_?([\d.]+)p_index", stem)  # the reference's ImageNet files: train_1p_index.csv
            return f"{share[1]}%" if share else stem
    for flag in ("num_labeled", "num_label"):
        if f.get(flag):
            return str(f[flag])
    if "label_ratio" in f:
        return f"{f['label_ratio'] or 15}%"  # selftuning.py's default ratio
    if "anno_percent" in f:
        return f"{f['anno_percent'] * 100:g}%"
    return "?"


def setting(run, selections):
    """What a run computes: its flags without the seed and the plumbing. A file of a selection run stands for that
    selection's setting, so that training runs on the picks of different selection seeds group together."""
    flags = {}
    for k, v in run.flags.items():
        if k != "seed" and k not in PLUMBING:
            chosen = selection_of(v, selections)
            flags[k] = [chosen.method, chosen.dataset, chosen.setting, Path(v).name] if chosen else v
    return flags


class Group:
    def __init__(self, runs):
        self.runs, first = runs, runs[0]
        self.method, self.dataset, self.backbone = first.method, first.dataset, first.backbone
        self.labels, self.flags = first.labels, first.setting
        self.done = [r.summary for r in runs if r.summary is not None]
        self.shown = ""  # the flags that tell it from the other groups of its method and dataset

    def stat(self, name):
        return mean_std([s.get(name) for s in self.done])


def natural(text):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def group_runs(runs):
    """Groups of runs with the same setting, sorted for the table. Selection runs come first: a training run's labels
    and setting name the selection it was trained on."""
    selections, by_setting = {}, {}
    for r in sorted(runs, key=lambda r: r.method not in SELECTION_METHODS):
        r.selection = next(filter(None, (selection_of(r.flags.get(f), selections) for f in LABELED_INDEX_FLAGS)), None)
        r.labels, r.setting = labels(r), setting(r, selections)
        if r.method in SELECTION_METHODS:
            selections.update({str(r.dir.resolve()): r, r.name: r})
        key = json.dumps([r.method, r.dataset, r.setting], sort_keys=True, default=str)
        by_setting.setdefault(key, []).append(r)
    groups = [Group(rs) for rs in by_setting.values()]
    for g in groups:
        family = [h for h in groups if (h.method, h.dataset) == (g.method, g.dataset)]
        differ = [k for k in sorted(set().union(*(h.flags for h in family)) - set(SHOWN))
                  if len({json.dumps(h.flags.get(k), default=str) for h in family}) > 1]
        g.shown = ", ".join(f"{k}={show(g.runs[0].flags.get(k))}" for k in differ)
    return sorted(groups, key=lambda g: (g.method, g.dataset, natural(g.labels), g.backbone or "", natural(g.shown)))


# ------------------------------------------------------------------------------------------------------- formatting
def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def show(value):
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, str) and "/" in value:
        return Path(value).name  # a path: its file name is what tells runs apart, the folders make it unreadable
    return "none" if value is None else str(value)


def pm(ms):
    mean, std = ms
    return "–" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")


def span(values):
    values = sorted({v for v in values if v is not None})
    return "" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def duration(seconds):
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def status(g):
    parts = []
    for r in g.runs:
        if r.summary is None:
            last = f"iter {r.evals[-1]['iter']}: {r.evals[-1]['top1']:.2f}" if r.evals else "no evaluation yet"
            parts.append(f"seed {r.flags.get('seed')} unfinished ({last})")
    return "; ".join(parts) or "done"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


# ------------------------------------------------------------------------------------------------ published numbers
def read_published(path=PUBLISHED):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same(value, text):
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value).lower() == text.lower()


def published_for(g, published):
    """The published top-1 of the group's setting: (value, line of the file), or None."""
    flags = g.runs[0].flags
    for p in published:
        if (p["script"] == g.method and p["dataset"] == g.dataset and p["labels"] == g.labels
                and p["metric"] in TOP1 and p["backbone"] in ("", g.backbone)
                and all(same(flags.get(k), v) for k, v in (c.split("=", 1) for c in p["flags"].split()))):
            value = float(p["value"])
            return (100 - value if p["metric"] == "top1_error" else value), p
    return None


NOT_RUN = "not run (needs GPUs)"


def setting_of(p):
    return tuple(p[k] for k in ("script", "dataset", "labels", "backbone", "flags"))


def by_setting(groups, published):
    """The groups under the setting of the published line each matches. Lines of one setting (the paper's number and
    the reference's, say) share its groups; a line with fewer flags (DebiasPL's, no `tau`) does not take the groups of
    the line before it (FixMatch's, `tau=0`)."""
    found = {}
    for g in groups or ():
        match = published_for(g, published)
        if match is not None:
            found.setdefault(setting_of(match[1]), []).append(g)
    return found


def this_code(lines, header, matched):
    """The `this code` cell of a published row: for each of its top-1 lines that is a setting of this code and has
    runs, the final top-1 of the matching groups, in the line's metric (an error as 100 - top-1)."""
    columns = list(header)
    runnable = sorted((p for p in lines if p["script"] and p["metric"] in TOP1),
                      key=lambda p: columns.index(p["column"]))
    if not runnable:
        return "–"
    found = []
    for p in runnable:
        groups, shown = matched.get(setting_of(p), []), []
        for g in groups:
            mean, std = g.stat("final_top1")
            if mean is not None and p["metric"] == "top1_error":
                mean = 100 - mean
            extra = f", {g.shown}" if len(groups) > 1 and g.shown else ""
            shown.append(f"{pm((mean, std))} (n={len(g.done)}{extra})" if g.done else "unfinished")
        if shown:
            found.append((header[p["column"]], ", ".join(shown)))
    if not found:
        return NOT_RUN
    if len(runnable) == 1:
        return found[0][1]
    return "; ".join(f"{name}: {text}" for name, text in found)  # the settings not run are left out


def published_tables(published, groups=None, method=None):
    """One markdown table per table of the file: a row per method, a column per setting (dataset, labels, metric:
    whichever of them varies in the table), the `this code` column from `groups`, the source under it. With `method`,
    that method's tables alone; without, every method's under its name."""
    if method is None:
        return "\n\n".join(f"## {m}\n\n{published_tables(published, groups, m)}"
                            for m in dict.fromkeys(p["method"] for p in published))
    if not any(p["method"] == method for p in published):
        raise UserError(f"{method}: no such method in {PUBLISHED.name}")
    matched, out = by_setting(groups, published), []
    for table in dict.fromkeys(p["table"] for p in published if p["method"] == method):
        lines = [{**p, "column": (p["dataset"], p["labels"], METRICS[p["metric"]])}
                 for p in published if p["method"] == method and p["table"] == table]
        columns = list(dict.fromkeys(p["column"] for p in lines))
        order = list(dict.fromkeys(c[0] for c in columns))  # datasets as the file lists them, labels ascending
        columns.sort(key=lambda c: (order.index(c[0]), natural(c[1])))
        varies = [len({c[i] for c in columns}) > 1 for i in range(3)]
        header = {c: " ".join(part for part, v in zip(c, varies) if v) or c[1] or c[0] for c in columns}
        cells = {(p["row"], p["column"]): p["value"] + (f" ± {p['std']}" if p["std"] else "") for p in lines}
        names = dict.fromkeys(p["row"] for p in lines)
        rows = [[name, *(cells.get((name, c), "–") for c in columns),
                 this_code([p for p in lines if p["row"] == name], header, matched)] for name in names]
        sources = {}
        for p in lines:
            sources.setdefault(p["source"], {})[p["row"]] = None
        source = f"Source: {next(iter(sources))}." if len(sources) == 1 else \
            "Sources: " + "; ".join(f"{', '.join(rs)}: {s}" for s, rs in sources.items()) + "."
        out += [table, "", markdown(["method", *header.values(), "this code"], rows), "", source, ""]
    return "\n".join(out[:-1])


BLOCK = re.compile(r"(<!-- published:(\S+) -->\n)(.*?)(<!-- /published -->)", re.S)


def docs_block(method, published, groups=None):
    """What stands between a docs page's markers: the method's tables, a blank line on either side."""
    return f"\n{published_tables(published, groups, method)}\n\n"


def write_docs(folder, published, groups=None):
    """Rewrite the published blocks of FOLDER/*.md in place; only the text between the markers changes."""
    pages = sorted(Path(folder).glob("*.md")) if Path(folder).is_dir() else []
    if not pages:
        raise UserError(f"{folder}: no markdown files in it")
    blocks = 0
    for path in pages:
        text = path.read_text()
        new, n = BLOCK.subn(lambda m: m[1] + docs_block(m[2], published, groups) + m[4], text)
        blocks += n
        if new != text:
            path.write_text(new)
        if n:
            print(f"{path}: {n} block{'s' * (n > 1)} {'rewritten' if new != text else 'up to date'}")
    if not blocks:
        raise UserError(f"{folder}: no <!-- published:METHOD --> block in its markdown files")


# ------------------------------------------------------------------------------------------------------------ report
HEADER = ["method", "dataset", "labels", "backbone", "flags", "n", "final top-1", "median of last 5",
          "best (test-selected)", "iters", "wall", "status"]
SELECTION_HEADER = ["method", "dataset", "budget", "flags", "n", "class coverage", "per class",
                    "trained on the selection", "status"]


def training_row(g, published, notes):
    """The markdown cells of a training group and its raw values for the CSV; `notes` collects the paper sources."""
    final, median, best = g.stat("final_top1"), g.stat("median_last_top1"), g.stat("best_top1")
    wall = mean_std([s.get("wall_s") for s in g.done])[0]
    iters = span([s.get("iters") for s in g.done])
    cells = [g.method, g.dataset, g.labels, g.backbone or "–", g.shown or "–", len(g.done), pm(final), pm(median),
             pm(best), iters or "–", duration(wall), status(g)]
    record = {"method": g.method, "dataset": g.dataset, "labels": g.labels, "backbone": g.backbone,
              "flags": g.shown, "n": len(g.done), "final_top1": final[0], "final_top1_std": final[1],
              "median_last_top1": median[0], "median_last_top1_std": median[1], "best_top1_test_selected": best[0],
              "best_top1_test_selected_std": best[1], "iters": iters, "wall_s": wall, "status": status(g)}
    if published is not None:
        match = published_for(g, published)
        if match is None:
            cells += ["–", "–"]
        else:
            value, p = match
            note = f"{p['row']}: {p['source']}"
            if note not in notes:
                notes.append(note)
            diff = None if final[0] is None else final[0] - value
            cells += [f"{round(value, 2):g} [{notes.index(note) + 1}]", "–" if diff is None else f"{diff:+.2f}"]
            record.update(paper_top1=round(value, 2), final_minus_paper=diff, paper_source=note)
    return cells, record


def trained_on(g, groups):
    """The training groups whose runs use one of this selection group's picks, with their final top-1."""
    linked = [h for h in groups if any(r.selection in g.runs for r in h.runs)]
    return "; ".join(f"{h.method}{f' ({h.shown})' if h.shown else ''}: {pm(h.stat('final_top1'))} "
                     f"(n={len(h.done)})" for h in linked) or "–"


def selection_row(g, groups):
    covered = [s["class_coverage"] for s in g.done if s.get("class_coverage") is not None]
    counts = [c for s in g.done for c in s.get("class_counts") or []]
    cells = [g.method, g.dataset, g.labels, g.shown or "–", len(g.done),
             f"{statistics.mean(covered):.3g}/{g.done[0].get('num_classes')}" if covered else "–",
             span(counts) or "–", trained_on(g, groups), status(g)]
    record = {"method": g.method, "dataset": g.dataset, "labels": g.labels, "flags": g.shown, "n": len(g.done),
              "class_coverage": cells[5], "per_class": cells[6], "trained_on_selection": cells[7], "status": cells[8]}
    return cells, record


PROPAGATION_HEADER = ["dataset", "seeds", "propagation", "n", "pseudo-label acc. (all)", "most confident 20%"]


def propagation_rows(groups):
    """metric_transfer's propagation_<kind>.json, over the seeds of each dataset, seed count and kind."""
    found = {}
    for r in (r for g in groups for r in g.runs):
        for path in sorted(r.dir.glob("propagation_*.json")):
            p = read_json(path)
            # one per seed: a fine-tuning comparison may propagate the same seeds again in another folder
            found.setdefault((r.dataset, p.get("num_labeled"), path.stem.split("_", 1)[1]), {})[r.flags.get("seed")] = p
    rows = []
    for (dataset, n, kind), by_seed in sorted(found.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        ps = list(by_seed.values())
        cells = [dataset, n, kind, len(ps), pm(mean_std([p.get("top100") for p in ps])),
                 pm(mean_std([p.get("top20") for p in ps]))]
        rows.append((cells, dict(zip(["dataset", "labels", "propagation", "n", "pseudo_label_acc", "top20"], cells))))
    return rows


def tables(groups, published=None):
    """The markdown text, and one dict of raw values per group for the CSV."""
    training = [g for g in groups if g.method not in SELECTION_METHODS]
    chosen = [g for g in groups if g.method in SELECTION_METHODS]
    notes, out, records = [], [], []
    if training:
        rows, recs = zip(*(training_row(g, published, notes) for g in training))
        paper = ["paper", "final − paper"] if published is not None else []
        out += ["## Training runs", "", markdown(HEADER + paper, rows), ""]
        out += [f"[{i}] {note}" for i, note in enumerate(notes, 1)] + ([""] if notes else [])
        records += recs
    if chosen:
        rows, recs = zip(*(selection_row(g, groups) for g in chosen))
        out += ["## Label selections", "", markdown(SELECTION_HEADER, rows), ""]
        records += recs
    propagated = propagation_rows(groups)
    if propagated:
        rows, recs = zip(*propagated)
        out += ["## Label propagation", "", markdown(PROPAGATION_HEADER, rows), ""]
        records += recs
    return "\n".join(out), records


def write_csv(path, records):
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in records)


def plot(groups, path):
    """Test top-1 against iteration: per group the mean over its runs, shaded from the lowest to the highest run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in groups:
        curves = [{e["iter"]: e["top1"] for e in r.evals} for r in g.runs if r.evals]
        if g.method in SELECTION_METHODS or not curves:  # usl_t's curve is cluster purity, not a classifier's top-1
            continue
        iters = sorted(set().union(*curves))
        at = [[c[i] for c in curves if i in c] for i in iters]
        label = " ".join(x for x in (g.method, g.dataset, g.labels, g.shown) if x) + f" (n={len(curves)})"
        line, = ax.plot(iters, [statistics.mean(v) for v in at], marker="o", markersize=3, label=label)
        ax.fill_between(iters, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.2)
    if not ax.lines:
        raise UserError("--plot: none of these runs has an evaluation of a classifier yet")
    ax.set(xlabel="iteration", ylabel="test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = runlib.Parser(prog="python -m common.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", metavar="RUNS_DIR", help="folders searched for run folders, recursively")
    p.add_argument("--paper", action="store_true", help="add the published number of each setting and the difference")
    p.add_argument("--csv", metavar="FILE", help="also write the tables as CSV, one row per group")
    p.add_argument("--plot", metavar="FILE.png", help="plot test top-1 against iteration, one line per group")
    p.add_argument("--published", action="store_true",
                   help="print the published numbers as markdown tables, with the final top-1 of the matching runs")
    p.add_argument("--write_docs", metavar="FOLDER",
                   help="with --published: rewrite the published blocks of FOLDER/*.md instead of printing")
    args = p.parse_args(argv)
    if args.write_docs and not args.published:
        raise UserError("--write_docs goes with --published")
    if args.published:
        groups = group_runs(find_runs(args.runs)) if args.runs else None
        if args.write_docs:
            write_docs(args.write_docs, read_published(), groups)
        else:
            print(published_tables(read_published(), groups))
        return
    if not args.runs:
        raise UserError("give at least one RUNS_DIR (or --published)")
    groups = group_runs(find_runs(args.runs))
    text, records = tables(groups, read_published() if args.paper else None)
    print(text)
    if args.csv:
        write_csv(args.csv, records)
    if args.plot:
        plot(groups, args.plot)


if __name__ == "__main__":
    runlib.entry(main)
