"""run.sh: every command it would launch names an existing script and parses with that script's flags."""
import importlib
import shlex
import subprocess

import pytest

from conftest import REPO


def listed_commands():
    out = subprocess.run(["bash", str(REPO / "run.sh"), "--list"], capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def test_list_covers_every_method_and_rejects_unknown_names():
    scripts = {next(a for a in cmd if a.endswith(".py")) for cmd in listed_commands()}
    assert scripts == {"selftuning.py", "debiaspl.py", "metric_transfer.py", "usl.py", "usl_t.py", "metasemi.py"}
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "fixmatch"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method 'fixmatch'")


@pytest.mark.parametrize("cmd", listed_commands(), ids=lambda cmd: " ".join(cmd[:4]))
def test_every_command_parses(cmd):
    assert cmd[0] in ("python", "torchrun"), cmd
    at = next(i for i, a in enumerate(cmd) if a.endswith(".py"))
    if cmd[0] == "torchrun":
        assert cmd[1:at] in (["--nproc_per_node", n] for n in ("2", "4", "8")), cmd
    module = importlib.import_module(cmd[at][:-3])
    try:
        module.parse_args(cmd[at + 1:])
    except SystemExit as exit_:  # argparse: an unknown flag or a bad value
        pytest.fail(f"{' '.join(cmd)} does not parse (exit {exit_.code})")
