"""The GPU suite (experiments/gpu/suite.py) end to end in its --dry_run mode: CPU backend, tiny
sizes, every stage, every output file (docs/gpu_tpu.md, "The GPU suite")."""

import csv
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = REPO / "experiments" / "gpu" / "suite.py"


def test_dry_run_writes_every_output(tmp_path):
  out = tmp_path / "gpu"
  proc = subprocess.run([sys.executable, str(SUITE), "--dry_run", f"--output_dir={out}",
                         f"--workdir={tmp_path / 'work'}"], cwd=REPO, capture_output=True,
                        text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = sorted(p.name for p in out.iterdir())
  assert files == ["attention.csv", "attention.md", "listops.csv", "listops.md", "summary.md",
                   "tests.txt"]
  assert len(files) <= 8          # what a device run can bring back
  kernels = list(csv.DictReader(open(out / "attention.csv")))
  assert {(r["mechanism"], r["passes"]) for r in kernels} == {
      (m, p) for m in ("dense.proper", "cast_topk.proper") for p in ("fwd", "fwd+bwd")}
  assert all(r["kernel"] == "xla" and float(r["tflop_per_s"]) > 0 for r in kernels)
  curves = list(csv.DictReader(open(out / "listops.csv")))
  assert {r["mechanism"] for r in curves} == {"dense", "cast"}
  assert [r["step"] for r in curves if r["mechanism"] == "cast"] == ["1", "2", "3"]
  summary = (out / "summary.md").read_text()
  assert "## tests: ok" in summary and "## kernels: ok" in summary and "## listops: ok" in summary
  assert "test_gpu_kernels.py" in (out / "tests.txt").read_text()
