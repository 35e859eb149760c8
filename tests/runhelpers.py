"""Helpers for command-line tests that run a script's main() in this process (no start-up cost)."""
import contextlib
import io
import subprocess

from common import run as runlib


def cli(main, *argv):
    """main(argv) through the scripts' entry point, as `python script.py argv` would run it; a CompletedProcess with
    the exit code and what went to stdout and stderr (bad input: code 2 and an `error:` line)."""
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runlib.entry(lambda: main(argv))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def snapshot(folder):
    """Every path under `folder` with its bytes (None for a folder): equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}
