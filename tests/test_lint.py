"""ruff (lint and import order, configured in pyproject.toml) is clean on the whole tree."""

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
  ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
  run = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr
