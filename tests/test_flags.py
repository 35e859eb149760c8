"""One meaning per shared flag: every script's parser, read side by side (README, "Shared flags")."""
import argparse
import importlib

import pytest

from conftest import assert_user_error, run_script, script_env
import fakedata
from common import run as runlib

SCRIPTS = ["selftuning", "debiaspl", "metric_transfer", "usl", "usl_t", "metasemi"]
TRAINING = ["selftuning", "debiaspl", "metric_transfer", "usl_t", "metasemi"]
HAS = {  # shared flag -> the scripts where it applies
    **{f: SCRIPTS for f in ("root", "dataset", "download", "recipe", "backbone", "pretrained", "batch_size",
                            "workers", "seed")},
    **{f: TRAINING for f in ("lr", "weight_decay", "max_iter", "stop_after", "eval_interval", "log_interval")},
    "epochs": ["debiaspl", "metric_transfer", "usl_t", "metasemi"],
    "num_labeled": ["selftuning", "debiaspl", "metric_transfer", "metasemi"],
    "budget": ["usl", "usl_t"],
    "dali": ["debiaspl", "metric_transfer", "usl", "metasemi"],
}
GROUPS = ("data", "model", "method", "optimisation", "run")  # --help's sections, in this order
RUN_FLAGS = ["logdir", "run_name", "resume", "device", "amp", "compile", "deterministic", "progress",
             "trust_checkpoint"]


class _Captured(Exception):
    pass


def parser_of(name, monkeypatch):
    """The argparse parser a script builds, caught as it is about to parse."""
    module = importlib.import_module(name)

    def catch(self, *args, **kwargs):
        raise _Captured(self)
    monkeypatch.setattr(runlib.Parser, "parse_args", catch)
    with pytest.raises(_Captured) as caught:
        module.parse_args([])
    return caught.value.args[0]


def action(parser, dest):
    found = [a for a in parser._actions if a.dest == dest]
    return found[0] if found else None


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_shared_flag_has_its_one_meaning(name, monkeypatch):
    p = parser_of(name, monkeypatch)
    for flag, scripts in HAS.items():
        a = action(p, flag)
        if name not in scripts:
            assert a is None, f"{name} has --{flag}, which does not apply to it"
            continue
        assert a is not None, f"{name} lacks the shared flag --{flag}"
        meaning = runlib.SHARED[flag]
        assert a.option_strings[0] == f"--{flag}", f"{name}: the canonical --{flag} must come first, as --help shows"
        assert f"--{flag.replace('_', '-')}" in a.option_strings
        assert a.help.startswith(meaning["help"]), f"{name} --{flag}: {a.help!r}"
        assert a.type is meaning.get("type"), f"{name} --{flag}: type {a.type}"
        if "action" in meaning:
            assert isinstance(a, meaning["action"]), f"{name} --{flag} is not a --{flag}/--no-{flag} switch"
        if flag == "pretrained":
            assert a.nargs == "?" and a.const is True and a.default is None
    for flag in RUN_FLAGS:
        assert action(p, flag) is not None, f"{name} lacks --{flag}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_grouped(name, monkeypatch):
    p = parser_of(name, monkeypatch)
    titles = [g.title for g in p._action_groups if g._group_actions and g.title not in ("options", "positional arguments")]
    order = [next((i for i, prefix in enumerate(GROUPS) if t.startswith(prefix)), None) for t in titles]
    assert None not in order and order == sorted(order), f"{name}: groups {titles}; expected {GROUPS} in order"
    loose = [a.dest for g in p._action_groups if g.title in ("options", "optional arguments")
             for a in g._group_actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
    assert loose == [], f"{name}: flags outside the groups: {loose}"
    for a in p._actions:  # every flag says what it does
        assert isinstance(a, argparse._HelpAction) or a.help, f"{name} --{a.dest} has no help"


@pytest.mark.parametrize("name", SCRIPTS)
def test_recipes_are_one_table_shown_in_help(name, monkeypatch):
    p = parser_of(name, monkeypatch)
    assert p.recipes, f"{name} has no RECIPES table"
    assert action(p, "recipe").choices == list(p.recipes)
    assert p.recipe_flags, f"{name}: no flag takes its default from the recipe"
    for recipe in p.recipes.values():
        assert set(recipe) == p.recipe_flags
    for flag in p.recipe_flags:
        a = action(p, flag)
        assert a.default is None and a.help.endswith(f"(default: {runlib.FROM_RECIPE})"), flag
    text = p.format_help()
    assert "recipes (--recipe" in text
    for flag in p.recipe_flags:
        assert f"--{flag} " in text.split("recipes (--recipe")[1], flag


def test_recipe_table_fills_only_what_was_not_given():
    p = runlib.Parser(recipes={"a": {"epochs": 10, "milestones": [3, 6]}, "b": {"epochs": 20, "milestones": []}})
    p.add_argument("--epochs", type=int, recipe=True, help="passes")
    p.add_argument("--milestones", type=int, nargs="*", recipe=True, help="steps")
    args = runlib.apply_recipe(p.parse_args(["--epochs", "7"]), p, "b")
    assert (args.epochs, args.milestones, args.recipe) == (7, [], "b")
    args = runlib.apply_recipe(p.parse_args([]), p, "a")
    assert (args.epochs, args.milestones) == (10, [3, 6])
    assert "recipe        a    b" in p.format_help() and "--milestones  3 6  -" in p.format_help()
    with pytest.raises(runlib.UserError, match="unknown recipe 'c': choose one of a, b"):
        runlib.apply_recipe(p.parse_args([]), p, "c")
    with pytest.raises(ValueError, match="a recipe flag's default is the recipe's"):
        p.add_argument("--lr", type=float, default=0.1, recipe=True, help="rate")


def test_shared_flag_keeps_its_meaning_and_adds_the_scripts_note():
    p = runlib.Parser()
    p.add_argument("--max_iter", "--total_steps", shared=True, default=5, help="the paper's 400k")
    a = action(p, "max_iter")
    assert a.option_strings == ["--max_iter", "--total_steps", "--max-iter", "--total-steps"]
    assert a.type is int and a.help == f"{runlib.SHARED['max_iter']['help']}; the paper's 400k (default: 5)"


@pytest.mark.parametrize("name", ["selftuning", "debiaspl", "metric_transfer", "metasemi"])
def test_a_label_count_the_split_cannot_honour_is_the_same_error_everywhere(name, tmp_path):
    root = fakedata.write_cifar(tmp_path / "cifar10")
    proc = run_script(f"{name}.py", "--root", root, "--dataset", "cifar10", "--num_labeled", "15", "--device", "cpu",
                      "--max_iter", "2", "--logdir", tmp_path / "runs", env=script_env(tmp_path), timeout=180)
    assert_user_error(proc, "15 labels cannot be split evenly over 10 classes", "multiple of 10")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*"))
