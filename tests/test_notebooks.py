"""The Colab notebooks: outputs stripped in git, and each one runs top to bottom in smoke mode.

Each notebook reads ``CLUSTR_JAX_NOTEBOOK_SMOKE=1`` (set here) and then uses small sizes: a few
training steps on a few hundred generated examples, short sequences, one timing repeat. The
kernel is this interpreter (``sys.executable``, through a kernelspec written into ``tmp_path``, so
no installed Jupyter kernel is picked up), with one CPU device as on Colab and XLA's cheapest CPU
compilation (``FAST_COMPILE_FLAGS``: at these sizes compiling is most of the time), and its
working directory is ``tmp_path``, where the notebooks write their run directories.
"""

import json
import os
import pathlib
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
KERNEL_NAME = "clustr_jax_test"
CELL_TIMEOUT_S = 600
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def notebook_id(path: pathlib.Path) -> str:
  return path.stem


def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} == {"quickstart.ipynb", "attention_maps.ipynb", "lra.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_outputs_are_stripped(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for index, cell in enumerate(nb.cells):
    where = f"{path.name} cell {index}"
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{where}: outputs not stripped"
      assert cell.execution_count is None, f"{where}: execution count not stripped"
    assert "execution" not in cell.metadata, f"{where}: execution metadata not stripped"
  assert "widgets" not in nb.metadata, f"{path.name}: widget state not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_badge_and_install_cell(path):
  """The first cell's Colab badge opens this very notebook; an install cell names REPO_URL."""
  nb = nbformat.read(path, as_version=4)
  badges = re.findall(r"https://colab\.research\.google\.com/github/([^)\s\"]+)",
                      nb.cells[0].source)
  assert badges, f"{path.name}: no Colab badge in the first cell"
  assert all(b.endswith(f"/colab/{path.name}") for b in badges), (path.name, badges)
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert re.search(r"^REPO_URL = ", code, re.M), f"{path.name}: no REPO_URL in the install cell"


def kernel_manager(tmp_path: pathlib.Path) -> AsyncKernelManager:
  """A kernel manager whose only kernel runs ``sys.executable -m ipykernel_launcher``."""
  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "clustr_jax test kernel", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def kernel_env() -> dict[str, str]:
  """This process's environment with smoke mode on, the repository importable, one CPU device."""
  env = dict(os.environ)
  env["CLUSTR_JAX_NOTEBOOK_SMOKE"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  # One device, and XLA's cheapest CPU compilation: the smoke sizes make compiling the main cost.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAGS}".strip()
  return env


@pytest.mark.slow  # Deselect with -m "not slow"; CI runs it.
@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  client = NotebookClient(nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(workdir)}})
  # Raises nbclient's CellExecutionError, with the failing cell and its traceback, on any error.
  client.execute(env=kernel_env())
