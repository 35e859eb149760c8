"""common/report.py on run folders written by hand: grouping, the tables, the CSV, --paper, --published, the plot."""
import csv
import json
import subprocess
import sys

import pytest

from conftest import REPO, script_env
from common import report
from common import run as runlib

DEBIASPL = {"root": "data/cifar10", "dataset": "cifar10", "trainindex_x": None, "trainindex_u": None,
            "anno_percent": 0.1, "num_labeled": 40, "backbone": "wrn28_2", "tau": 0.4, "eman": False,
            "use_clip": False, "epochs": 1024, "lr": 0.03, "seed": 0, "workers": 4, "logdir": "runs",
            "run_name": None, "device": "auto", "progress": None}


def write_run(folder, method, flags, evals=None, summary=None):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"method": method, "argv": [f"{method}.py"], "flags": flags,
                                                  "versions": {"torch": "2.14.1"}}))
    if evals is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def finished(final, median, best, wall, iters=100):
    evals = [{"iter": iters // 2, "top1": final - 10, "top5": None, "wall_s": wall / 2},
             {"iter": iters, "top1": final, "top5": None, "wall_s": wall}]
    return evals, {"final_top1": final, "best_top1": best, "median_last_top1": median, "iters": iters, "wall_s": wall}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # DebiasPL, 40 labels, three seeds; the seeds also differ in flags that cannot change a result
    plumbing = [{}, {"workers": 0, "logdir": "elsewhere", "run_name": "mine", "device": "cpu"}, {"progress": True}]
    for seed, (final, extra) in enumerate(zip((90.0, 92.0, 94.0), plumbing)):
        write_run(root / f"debiaspl-cifar10-40-s{seed}", "debiaspl", {**DEBIASPL, "seed": seed, **extra},
                  *finished(final, final - 1, final + 1, 30.0 * (seed + 1)))
    # FixMatch (tau 0), 40 labels: two finished seeds and one cut off after its first evaluation
    for seed, final in enumerate((85.0, 87.0)):
        write_run(root / f"fixmatch-cifar10-40-s{seed}", "debiaspl", {**DEBIASPL, "tau": 0.0, "seed": seed},
                  *finished(final, final - 1, final + 1, 3600.0 * (seed + 1)))
    write_run(root / "fixmatch-cifar10-40-s2", "debiaspl", {**DEBIASPL, "tau": 0.0, "seed": 2},
              [{"iter": 50, "top1": 70.5, "top5": None, "wall_s": 10.0}])
    # USL selections of 100 labels with two k-means seeds, one folder down, and FixMatch trained on each of them: once
    # by a relative path typed elsewhere (matched by the folder name), once by an absolute path
    for seed, counts in ((1, [10] * 10), (2, [11, 11, 11, 11, 12, 11, 11, 11, 11, 0])):
        write_run(root / "usl" / f"usl-cifar10-100-s{seed}", "usl",
                  {"root": "data/cifar10", "dataset": "cifar10", "selection": "usl", "budget": 100, "seed": seed,
                   "reg_lambda": 0.5, "cache_dir": f"cache{seed}", "workers": 2, "logdir": "runs/usl"},
                  summary={"final_top1": None, "iters": None, "wall_s": 20.0, "budget": 100, "num_classes": 10,
                           "class_coverage": sum(c > 0 for c in counts), "class_counts": counts})
    for seed, (path, final) in enumerate((("runs/usl/usl-cifar10-100-s1/selected.csv", 93.0),
                                          (str(root / "usl" / "usl-cifar10-100-s2" / "selected.csv"), 94.0)), 1):
        write_run(root / f"fixmatch-usl-cifar10-100-s{seed}", "debiaspl",
                  {**DEBIASPL, "num_labeled": None, "trainindex_x": path, "tau": 0.0},
                  *finished(final, final - 0.5, final + 1, 60.0 + 40.0 * (seed - 1)))
    # Deep Metric Transfer stopped while fine-tuning: the pretraining monitor lines are not test accuracies
    write_run(root / "metric_transfer-cifar10-250-s0", "metric_transfer",
              {"stage": "all", "root": "data/cifar10", "dataset": "cifar10", "num_labeled": 250, "labeled_file": None,
               "backbone": "wrn28_2", "seed": 0},
              [{"iter": 10, "top1": 30.0, "stage": "pretrain"}, {"iter": 200, "top1": 55.25, "stage": "finetune"},
               {"iter": 400, "top1": 81.0, "stage": "pretrain"}])
    # Self-Tuning with the script's defaults: dataset from the root's name, the default 15 % of labels
    write_run(root / "selftuning-cub200-15pct-s666666", "selftuning",
              {"root": "data/CUB200", "dataset": None, "label_ratio": None, "num_labeled": 0, "backbone": "resnet50",
               "pgc": True, "seed": 666666}, *finished(65.0, 64.5, 66.25, 18000.0, iters=27005))
    return root


TABLE = """\
## Training runs

| method | dataset | labels | backbone | flags | n | final top-1 | median of last 5 | best (test-selected) | iters | wall | status |
|---|---|---|---|---|---|---|---|---|---|---|---|
| debiaspl | cifar10 | 40 | wrn28_2 | tau=0.0 | 2 | 86.00 ± 1.41 | 85.00 ± 1.41 | 87.00 ± 1.41 | 100 | 90 min | seed 2 unfinished (iter 50: 70.50) |
| debiaspl | cifar10 | 40 | wrn28_2 | tau=0.4 | 3 | 92.00 ± 2.00 | 91.00 ± 2.00 | 93.00 ± 2.00 | 100 | 60 s | done |
| debiaspl | cifar10 | usl:100 | wrn28_2 | tau=0.0 | 2 | 93.50 ± 0.71 | 93.00 ± 0.71 | 94.50 ± 0.71 | 100 | 80 s | done |
| metric_transfer | cifar10 | 250 | wrn28_2 | – | 0 | – | – | – | – | – | seed 0 unfinished (iter 200: 55.25) |
| selftuning | cub200 | 15% | resnet50 | – | 1 | 65.00 | 64.50 | 66.25 | 27005 | 5.0 h | done |

## Label selections

| method | dataset | budget | flags | n | class coverage | per class | trained on the selection | status |
|---|---|---|---|---|---|---|---|---|
| usl | cifar10 | 100 | – | 2 | 9.5/10 | 0–12 | debiaspl (tau=0.0): 93.50 ± 0.71 (n=2) | done |
"""


def test_markdown_table(runs, capsys):
    report.main([str(runs)])
    assert capsys.readouterr().out == TABLE + "\n"


def test_grouping(runs):
    groups = report.group_runs(report.find_runs([runs]))
    assert [(g.method, g.labels, g.shown, sorted(r.name for r in g.runs)) for g in groups] == [
        ("debiaspl", "40", "tau=0.0", ["fixmatch-cifar10-40-s0", "fixmatch-cifar10-40-s1", "fixmatch-cifar10-40-s2"]),
        ("debiaspl", "40", "tau=0.4", ["debiaspl-cifar10-40-s0", "debiaspl-cifar10-40-s1", "debiaspl-cifar10-40-s2"]),
        ("debiaspl", "usl:100", "tau=0.0", ["fixmatch-usl-cifar10-100-s1", "fixmatch-usl-cifar10-100-s2"]),
        ("metric_transfer", "250", "", ["metric_transfer-cifar10-250-s0"]),
        ("selftuning", "15%", "", ["selftuning-cub200-15pct-s666666"]),
        ("usl", "100", "", ["usl-cifar10-100-s1", "usl-cifar10-100-s2"])]


def test_a_flag_that_changes_results_splits_a_group(tmp_path):
    for name, flags in (("a", {}), ("b", {"seed": 1, "workers": 0, "run_name": "b"}), ("c", {"lr": 0.01})):
        write_run(tmp_path / name, "debiaspl", {**DEBIASPL, **flags}, *finished(90.0, 90.0, 90.0, 1.0))
    groups = report.group_runs(report.find_runs([tmp_path]))
    assert [(g.shown, [r.name for r in g.runs]) for g in groups] == [("lr=0.01", ["c"]), ("lr=0.03", ["a", "b"])]


def test_paper_column_and_difference(runs, capsys):
    report.main([str(runs), "--paper"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[-2:] for line in out.splitlines()
            if line.startswith(("| debiaspl", "| metric_transfer", "| selftuning"))]
    assert rows == [["86.19 [1]", "-0.19 |"], ["94.6 [2]", "-2.60 |"], ["93.2 [3]", "+0.30 |"], ["71.26 [4]", "– |"],
                    ["64.17 [5]", "+0.83 |"]]
    assert "| status | paper | final − paper |\n" in out
    assert out.split("\n\n")[2] == """\
[1] FixMatch (FixMatch paper): FixMatch paper (RandAugment)
[2] DebiasPL w/ FixMatch (paper): DebiasPL paper via paperswithcode (error 5.4 and 4.6)
[3] FixMatch: Papers with Code "cold start" board (error 6.5 and 6.8)
[4] Deep Metric Transfer: reference README
[5] Self-Tuning (paper): paper Table 1 (authors' slides p. 11 and poster)"""


def test_paper_matches_flags_backbone_and_reference_index_files(tmp_path, capsys):
    imagenet = {**DEBIASPL, "root": "imagenet", "dataset": "imagenet", "num_labeled": None, "backbone": "resnet50",
                "eman": True, "tau": 0.4, "trainindex_x": "train_1p_index.csv"}
    for name, flags in (("clip", {"use_clip": True, "epochs": 100}), ("plain", {"epochs": 50}),
                        ("fixmatch", {"epochs": 50, "tau": 0}), ("r18", {"epochs": 50, "backbone": "resnet18"}),
                        ("longer", {"epochs": 60})):
        write_run(tmp_path / name, "debiaspl", {**imagenet, **flags}, *finished(60.0, 60.0, 60.0, 1.0))
    write_run(tmp_path / "metasemi", "metasemi", {"root": "data/cifar10", "dataset": "cifar10", "num_label": 4000,
                                                 "arch": "convlarge", "mix_up": True, "seed": 8469},
              *finished(92.0, 92.0, 92.0, 1.0))
    report.main([str(tmp_path), "--paper"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| debiaspl", "| metasemi"))]
    assert [(r[2], r[3], r[4], r[-2], r[-1]) for r in rows] == [
        ("1%", "resnet18", "epochs=50, tau=0.4, use_clip=False", "–", "– |"),
        ("1%", "resnet50", "epochs=50, tau=0, use_clip=False", "60.9 [1]", "-0.90 |"),
        ("1%", "resnet50", "epochs=50, tau=0.4, use_clip=False", "65.3 [2]", "-5.30 |"),
        ("1%", "resnet50", "epochs=60, tau=0.4, use_clip=False", "–", "– |"),
        ("1%", "resnet50", "epochs=100, tau=0.4, use_clip=True", "71.3 [3]", "-11.30 |"),
        ("4000", "convlarge", "–", "92.22 [4]", "-0.22 |")]  # error 7.78 compared as top-1 92.22


def test_csv(runs, tmp_path, capsys):
    report.main([str(runs), "--csv", str(tmp_path / "runs.csv"), "--paper"])
    with open(tmp_path / "runs.csv", newline="") as f:
        header = f.readline()
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert header == ("method,dataset,labels,backbone,flags,n,final_top1,final_top1_std,median_last_top1,"
                      "median_last_top1_std,best_top1_test_selected,best_top1_test_selected_std,iters,wall_s,status,"
                      "paper_top1,final_minus_paper,paper_source,class_coverage,per_class,trained_on_selection\r\n")
    assert len(rows) == 6
    assert rows[0] == {"method": "debiaspl", "dataset": "cifar10", "labels": "40", "backbone": "wrn28_2",
                       "flags": "tau=0.0", "n": "2", "final_top1": "86.0", "final_top1_std": "1.4142",
                       "median_last_top1": "85.0", "median_last_top1_std": "1.4142",
                       "best_top1_test_selected": "87.0", "best_top1_test_selected_std": "1.4142", "iters": "100",
                       "wall_s": "5400.0", "status": "seed 2 unfinished (iter 50: 70.50)", "paper_top1": "86.19",
                       "final_minus_paper": "-0.19",
                       "paper_source": "FixMatch (FixMatch paper): FixMatch paper (RandAugment)",
                       "class_coverage": "", "per_class": "", "trained_on_selection": ""}
    assert rows[4]["final_top1_std"] == "" and rows[4]["iters"] == "27005" and rows[4]["wall_s"] == "18000.0"
    assert {k: v for k, v in rows[5].items() if v} == {
        "method": "usl", "dataset": "cifar10", "labels": "100", "n": "2", "class_coverage": "9.5/10",
        "per_class": "0–12", "trained_on_selection": "debiaspl (tau=0.0): 93.50 ± 0.71 (n=2)", "status": "done"}


def test_plot_writes_a_png(runs, tmp_path, capsys):
    report.main([str(runs), "--plot", str(tmp_path / "top1.png")])
    data = (tmp_path / "top1.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_published_tables():
    published = report.read_published()
    assert {p["method"] for p in published} == {"selftuning", "debiaspl", "metric_transfer", "usl", "metasemi"}
    assert all(p["source"] and float(p["value"]) >= 0 for p in published)
    scripts = {"selftuning", "selftuning-ft", "debiaspl", "metric_transfer", "metasemi", ""}
    assert {p["script"] for p in published} == scripts
    text = report.published_tables(published)
    assert text.startswith("## selftuning\n\nCUB-200-2011, ResNet-50 ImageNet-pretrained, top-1 % by label "
                           "proportion\n")
    assert """\
CIFAR-10, WRN-28-2, top-1 % by number of labels

| method | 40 | 250 | this code |
|---|---|---|---|
| FixMatch (FixMatch paper) | 86.19 ± 3.37 | 94.93 ± 0.65 | not run (needs GPUs) |
| DebiasPL w/ FixMatch (paper) | 94.6 | 95.4 | not run (needs GPUs) |

Sources: FixMatch (FixMatch paper): FixMatch paper (RandAugment); DebiasPL w/ FixMatch (paper): DebiasPL paper via \
paperswithcode (error 5.4 and 4.6).
""" in text
    assert """\
| method | top-1 error | top-5 error | this code |
|---|---|---|---|
| Labeled-only | 53.65 | 31.01 | – |
""" in text
    assert "| MetaSemi | 3.15 | 7.78 | 30.74 | not run (needs GPUs) |\n" in text
    assert "| Deep Metric Transfer | 56.34 | 63.53 | 71.26 | 74.77 | 79.38 | 82.34 | 84.52 | 87.48 | not run (needs " \
           "GPUs) |\n" in text
    assert "| Π-model | 27.36 | 37.20 | 47.07 | 56.30 | 63.70 | 76.50 | 84.17 | 87.30 | – |\n" in text  # not here


def test_published_tables_of_one_method():
    published = report.read_published()
    text = report.published_tables(published, method="metasemi")
    assert text.startswith("ConvLarge, error % (SVHN 1000, CIFAR-10 4000, CIFAR-100 10000 labels)\n\n| method |")
    assert text.endswith("Source: authors' slides p. 17 and the reference README.")
    assert report.published_tables(published).endswith("\n## metasemi\n\n" + text)
    with pytest.raises(runlib.UserError, match="nosuch: no such method"):
        report.published_tables(published, method="nosuch")


def this_code(text):
    """The `this code` cell of each table row whose cell is not `–`, by row name."""
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")]
    return [(r[0], r[-1]) for r in rows if r[0] != "method" and r[-1] != "–"]


def test_this_code_column_from_run_folders(runs, capsys):
    report.main(["--published", str(runs)])
    cells = this_code(capsys.readouterr().out)
    assert ("Fine-Tuning (paper)", report.NOT_RUN) in cells and ("MetaSemi", report.NOT_RUN) in cells
    assert [(name, cell) for name, cell in cells if cell != report.NOT_RUN] == [
        # both lines of the CUB 15 % setting; the runs of one setting only, the other columns left out
        ("Self-Tuning (paper)", "15%: 65.00 (n=1)"),
        ("Self-Tuning (reference README screenshots)", "15%: 65.00 (n=1)"),
        # FixMatch (tau 0) is not DebiasPL, whose line has no tau: each row gets its own runs
        ("FixMatch (FixMatch paper)", "40: 86.00 ± 1.41 (n=2)"),
        ("DebiasPL w/ FixMatch (paper)", "40: 92.00 ± 2.00 (n=3)"),
        ("Deep Metric Transfer", "250: unfinished"),
        ("FixMatch", "usl:100: 93.50 ± 0.71 (n=2)")]


def test_this_code_as_an_error_and_per_group(tmp_path):
    for name, lr, final in (("a", 0.1, 92.0), ("b", 0.1, 93.0), ("c", 0.03, 90.5)):
        write_run(tmp_path / name, "metasemi", {"root": "data/cifar10", "dataset": "cifar10", "num_labeled": 4000,
                                               "arch": "convlarge", "mix_up": True, "lr": lr, "seed": ord(name)},
                  *finished(final, final, final, 1.0))
    groups = report.group_runs(report.find_runs([tmp_path]))
    text = report.published_tables(report.read_published(), groups, method="metasemi")
    # error tables show 100 - top-1; two groups of one setting each with the flags that tell them apart
    assert ("MetaSemi", "cifar10 4000: 7.50 ± 0.71 (n=2, lr=0.1), 9.50 (n=1, lr=0.03)") in this_code(text)
    assert ("MetaSemi", report.NOT_RUN) in this_code(text)  # ImageNet: no run
    assert "| meta + mixup | 3.15 | 7.78 | 30.74 | – |" in text  # the ablation rows name no flags: not matched


def test_write_docs(tmp_path, capsys):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("# Page\n\nbefore\n<!-- published:usl -->\nold\n<!-- /published -->\nafter\n")
    report.main(["--published", "--write_docs", str(page.parent)])
    assert capsys.readouterr().out == f"{page}: 1 block rewritten\n"
    published = report.read_published()
    assert page.read_text() == ("# Page\n\nbefore\n<!-- published:usl -->\n"
                                f"\n{report.published_tables(published, method='usl')}\n\n<!-- /published -->\nafter\n")
    report.main(["--published", "--write_docs", str(page.parent)])
    assert capsys.readouterr().out == f"{page}: 1 block up to date\n"


def test_published_command(capsys):
    report.main(["--published"])
    assert capsys.readouterr().out == report.published_tables(report.read_published()) + "\n"


def user_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        runlib.entry(lambda: report.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no run folders" in user_error([str(tmp_path / "empty")], capsys)
    assert "no such folder" in user_error([str(tmp_path / "missing")], capsys)
    write_run(tmp_path / "broken" / "a", "debiaspl", DEBIASPL)
    (tmp_path / "broken" / "a" / "metrics.jsonl").write_text('{"iter": 1, "top1": 5.0}\n{"iter": 2, "top1"\n')
    assert f"{tmp_path / 'broken' / 'a' / 'metrics.jsonl'} line 2: malformed JSON" in user_error(
        [str(tmp_path / "broken")], capsys)
    (tmp_path / "broken" / "a" / "args.json").write_text('{"method": "debiaspl", ')
    assert f"{tmp_path / 'broken' / 'a' / 'args.json'}: cannot read it as JSON" in user_error(
        [str(tmp_path / "broken")], capsys)
    assert "give at least one RUNS_DIR" in user_error([], capsys)
    assert "--write_docs goes with --published" in user_error(["--write_docs", str(tmp_path)], capsys)
    assert "no markdown files" in user_error(["--published", "--write_docs", str(tmp_path / "empty")], capsys)
    (tmp_path / "empty" / "page.md").write_text("no block\n")
    assert "no <!-- published:METHOD --> block" in user_error(
        ["--published", "--write_docs", str(tmp_path / "empty")], capsys)
    (tmp_path / "empty" / "page.md").write_text("<!-- published:nosuch -->\n<!-- /published -->\n")
    assert "nosuch: no such method" in user_error(["--published", "--write_docs", str(tmp_path / "empty")], capsys)


def test_command_line_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "common.report", str(tmp_path)], cwd=REPO, env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path}: no run folders in it (a run folder holds args.json)\n"


def test_label_propagation_table_over_seeds(tmp_path, capsys):
    for seed, (knn, spectral) in enumerate([(50.0, 70.0), (60.0, 80.0)]):
        flags = {"dataset": "digits", "num_labeled": 10, "seed": seed, "backbone": "resnet18"}
        for name in (f"mt-s{seed}", f"mt-seeds-only-s{seed}"):  # the second propagates the same seeds again
            write_run(tmp_path / name, "metric_transfer", {**flags, "run_name": name}, *finished(80.0, 80.0, 80.0, 9))
            (tmp_path / name / "propagation_knn.json").write_text(json.dumps(
                {"top20": knn + 30, "top100": knn, "num_labeled": 10}))
        (tmp_path / f"mt-s{seed}" / "propagation_spectral.json").write_text(json.dumps(
            {"top20": spectral + 15, "top100": spectral, "num_labeled": 10}))
    report.main([str(tmp_path)])
    text = capsys.readouterr().out
    assert text.split("## Label propagation\n\n")[1] == (
        "| dataset | seeds | propagation | n | pseudo-label acc. (all) | most confident 20% |\n"
        "|---|---|---|---|---|---|\n"
        "| digits | 10 | knn | 2 | 55.00 ± 7.07 | 85.00 ± 7.07 |\n"
        "| digits | 10 | spectral | 2 | 75.00 ± 7.07 | 90.00 ± 7.07 |\n\n")
