r"""The GPU suite: what one short GPU window should establish, in one command of under 8 minutes.

Three stages, each timed, outputs in --output_dir (default ``experiments/results/gpu/``, at most
8 files, none in a sub-folder: what a device run can bring back):

  1. tests    pytest on the test files that hold ``@pytest.mark.gpu`` tests, with ``-m gpu``
              (the cuDNN call chosen and equal to the XLA path; CAST's fused path equal to its
              batched product): ``tests.txt``.
  2. kernels  the attention benchmark's machinery (``experiments/benchmarks/attention.py``:
              compile apart, cost and memory analysis, interleaved timing, medians) on dense
              attention proper (cuDNN's fused kernel on the GPU) and CAST proper (Top-K, N_c 64,
              kappa 128, its intra-cluster attention through cuDNN) at 1K-32K tokens, batch 1,
              8 heads x 64, bfloat16, forward and forward+backward. Achieved TFLOP/s and GB/s
              against this run's own ceilings (a bfloat16 matmul and a device copy, timed in the
              same process): ``attention.csv``, ``attention.md``.
              FLOPs: dense counts 4 B H N^2 d forward and 2.5 times that backward (FlashAttention-2
              §4.1's convention, recomputation included); CAST's are XLA's cost analysis of the
              same function with its intra-cluster attention as plain products (XLA counts no
              FLOPs inside a cuDNN call). Bytes: XLA's 'bytes accessed' of the program that ran
              (a fused call counts its operands and results).
  3. listops  300 training steps of the official LRA ListOps config (``configs/lra/listops.py``:
              4 layers, width 512, 8 heads, 2,000 tokens, batch 32, float32, dropout 0.1/0.1)
              for dense and CAST, each in its own process: steps/s, device peak memory, the loss
              curve every 10 steps, validation/test accuracy after 300 steps. Changed from the
              official run only in length of run and data: 300 steps, 9,600 generated training
              examples (300 x 32), 256 validation and 256 test examples, evaluation at step 300:
              ``listops.csv`` (loss curves), ``listops.md``.
  ``summary.md``: device, versions, stage times, the ceilings and each stage's outcome.

  python experiments/gpu/suite.py                   # on the GPU machine (via run.sh)
  python experiments/gpu/suite.py --dry_run --output_dir=/tmp/gpu_dry   # CPU, tiny, ~1 min

--dry_run runs every stage on the CPU backend at tiny sizes (128 tokens, 2 heads x 16; the
ListOps CPU variant's data with a 1-layer model of width 32 for 3 steps), so that the whole path
is tested without a GPU (tests/test_gpu_suite.py). A stage that fails is reported in summary.md
and the suite goes on; the exit status is non-zero if any stage failed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
import traceback
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results" / "gpu"
LISTOPS_STEPS, LISTOPS_BATCH = 300, 32
MECHANISMS = ("dense", "cast")


def _load_benchmark():
  """experiments/benchmarks/attention.py, loaded from its path (it is a script, as in models.py)."""
  path = REPO / "experiments" / "benchmarks" / "attention.py"
  sys.path.insert(0, str(path.parent))       # its sibling module cpu_memory
  spec = importlib.util.spec_from_file_location("attention_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module            # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


# --------------------------------------------------------------------------------------------
# Stage 1: the tests marked gpu.
# --------------------------------------------------------------------------------------------

def gpu_test_files() -> list[str]:
  """The test files that hold ``@pytest.mark.gpu`` tests (relative to the repository)."""
  return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                if "pytest.mark.gpu" in p.read_text())


def run_tests(out: pathlib.Path, dry_run: bool) -> dict[str, Any]:
  """pytest -m gpu on ``gpu_test_files()``; its output into ``tests.txt``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu" if dry_run else "")
  cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         *gpu_test_files()]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  (out / "tests.txt").write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}{proc.stderr}")
  last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
  # pytest's exit 5: nothing ran (every gpu test skipped on the CPU of a dry run).
  return {"ok": proc.returncode in ((0, 5) if dry_run else (0,)), "result": last}


# --------------------------------------------------------------------------------------------
# Stage 2: kernels against the machine's ceilings.
# --------------------------------------------------------------------------------------------

def measure_ceilings(bench, matmul_size: int, copy_mib: int, reps: int) -> dict[str, float]:
  """This run's ceilings: bfloat16 matmul TFLOP/s and device copy GB/s (read + write), medians."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (matmul_size, matmul_size), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a).lower(a).compile()
  x = jnp.zeros((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0).lower(x).compile()
  for fn, arg in ((matmul, a), (copy, x)):
    jax.block_until_ready(fn(arg))
  t_mm = bench._median([bench._timed_call(matmul, (a,)) for _ in range(reps)])  # pylint: disable=protected-access
  t_cp = bench._median([bench._timed_call(copy, (x,)) for _ in range(reps)])  # pylint: disable=protected-access
  return {"matmul_tflop_per_s": 2 * matmul_size ** 3 / t_mm / 1e12,
          "copy_gb_per_s": 2 * x.nbytes / t_cp / 1e9}


def kernel_of(compiled) -> str:
  """Which attention kernel a compiled program holds: 'cudnn', 'splash' or 'xla'."""
  text = compiled.as_text()
  if "__cudnn$fmha" in text:
    return "cudnn"
  return "splash" if "tpu_custom_call" in text else "xla"


def dense_flops(passes: str, batch: int, heads: int, length: int, head_dim: int) -> float:
  """Dense attention's FLOPs: 4 B H N^2 d forward, 2.5 times that backward (FlashAttention-2)."""
  forward = 4.0 * batch * heads * length ** 2 * head_dim
  return forward if passes == "fwd" else 3.5 * forward


def run_kernels(out: pathlib.Path, lengths: list[int], dtype_name: str, reps: int,
                ceilings_args: tuple[int, int], heads: int = 8,
                head_dim: int = 64) -> dict[str, Any]:
  """Dense and CAST proper at ``lengths`` through the benchmark's machinery (batch 1)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from clustr_jax.attention import cast  # pylint: disable=import-outside-toplevel
  bench = _load_benchmark()
  batch = 1
  ceilings = measure_ceilings(bench, *ceilings_args, reps=reps)
  rows = []
  for length in lengths:
    cases = []
    for mechanism in ("dense.proper", "cast_topk.proper"):
      for case in bench.build_cases(mechanism, batch, length, heads, head_dim,
                                    jnp.dtype(dtype_name), 0.1):
        if mechanism.startswith("cast"):
          case.flops_overrides += ((cast, "INTRA_IMPLEMENTATION", "batched"),)
        bench.compile_case(case, max_memory_bytes=60 * 2**30)
        cases.append(case)
    bench.run_interleaved(cases, reps, reps, time_cap_s=math.inf, matmul_times=[])
    for case in cases:
      median = bench._median(case.times)  # pylint: disable=protected-access
      cost = case.compiled.cost_analysis() if case.compiled is not None else None
      cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
      flops = (dense_flops(case.passes, batch, heads, length, head_dim)
               if case.mechanism.startswith("dense") else case.flops)
      moved = float(cost.get("bytes accessed", math.nan))
      tflops, gbs = flops / median / 1e12, moved / median / 1e9
      rows.append({
          "mechanism": case.mechanism, "passes": case.passes, "dtype": dtype_name,
          "length": length, "kernel": kernel_of(case.compiled) if case.compiled else "",
          "median_ms": round(median * 1e3, 3), "reps": len(case.times),
          "compile_s": round(case.compile_s, 2), "tflops": _sig(flops / 1e12),
          "tflop_per_s": _sig(tflops), "of_matmul": _sig(tflops / ceilings["matmul_tflop_per_s"]),
          "gb_per_s": _sig(gbs), "of_copy": _sig(gbs / ceilings["copy_gb_per_s"]),
          "memory_mib": round(case.memory_bytes / 2**20, 1), "note": case.note})
    print(f"[kernels] N={length}: " + ", ".join(
        f"{r['mechanism']}/{r['passes']} {r['median_ms']} ms ({r['kernel']})"
        for r in rows[-len(cases):]), flush=True)
  _write_csv(out / "attention.csv", rows)
  lines = [f"# Attention kernels on `{jax.devices()[0].device_kind}`", "",
           f"Batch {batch}, {heads} heads x {head_dim}, {dtype_name}; medians of {reps} "
           "interleaved calls after a warm-up (experiments/benchmarks/attention.py's machinery). "
           f"Ceilings of this run: bfloat16 {ceilings_args[0]}^3 matmul "
           f"{ceilings['matmul_tflop_per_s']:.4g} TFLOP/s, device copy of {ceilings_args[1]} MiB "
           f"{ceilings['copy_gb_per_s']:.4g} GB/s. `of_matmul`, `of_copy`: the fractions of "
           "them. Dense FLOPs: 4 B H N^2 d forward, x3.5 forward+backward (FlashAttention-2's "
           "convention); CAST's: XLA's count with plain intra-cluster products. Bytes: XLA's "
           "'bytes accessed' of the program that ran.", "", *_markdown_table(rows)]
  (out / "attention.md").write_text("\n".join(lines) + "\n")
  dense_kernels = {r["kernel"] for r in rows if r["mechanism"].startswith("dense")}
  return {"ok": True, "ceilings": ceilings, "dense_kernels": sorted(dense_kernels),
          "rows": len(rows)}


# --------------------------------------------------------------------------------------------
# Stage 3: 300 steps of the official ListOps config, one process per mechanism.
# --------------------------------------------------------------------------------------------

def listops_config(mechanism: str, dry_run: bool):
  """The official ListOps config (``:cpu`` for a dry run) for ``mechanism``, run length and data
  reduced to what the stage needs (see the module docstring)."""
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.load(f"{REPO}/configs/lra/listops.py:{'cpu,' if dry_run else ''}"
                       f"attention={mechanism}")
  steps, batch = (3, 8) if dry_run else (LISTOPS_STEPS, LISTOPS_BATCH)
  if dry_run:
    config.model.update(emb_dim=32, num_heads=2, qkv_dim=32, mlp_dim=64, num_layers=1)
  config.num_train_steps = steps
  config.batch_size = config.eval_batch_size = batch
  config.dataset.generator.update(num_train=steps * batch, num_val=32 if dry_run else 256,
                                  num_test=32 if dry_run else 256)
  config.log_every_steps = 1 if dry_run else 10
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  return config


def train_one(mechanism: str, workdir: pathlib.Path, dry_run: bool) -> None:
  """Trains ``mechanism`` in this process; writes ``<workdir>/memory.json`` (peak bytes)."""
  import jax  # pylint: disable=import-outside-toplevel

  from clustr_jax import train  # pylint: disable=import-outside-toplevel
  train.train_and_evaluate(listops_config(mechanism, dry_run), workdir)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  source = "device peak_bytes_in_use"
  if peak is None:   # the CPU keeps no device statistics: the process's peak resident memory
    peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
  (workdir / "memory.json").write_text(json.dumps({"peak_bytes": peak, "source": source}))


def run_listops(out: pathlib.Path, workroot: pathlib.Path, dry_run: bool) -> dict[str, Any]:
  """``train_one`` for each mechanism in a fresh process; loss curves and a summary table."""
  curves, summary, failed = [], [], []
  for mechanism in MECHANISMS:
    workdir = workroot / f"listops_{mechanism}"
    cmd = [sys.executable, __file__, f"--train_one={mechanism}", f"--workdir={workdir}"]
    cmd += ["--dry_run"] if dry_run else []
    env = dict(os.environ, JAX_PLATFORMS="cpu") if dry_run else dict(os.environ)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - start
    if proc.returncode != 0:
      failed.append(f"{mechanism}: exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
      continue
    results = json.loads((workdir / "results.json").read_text())
    memory = json.loads((workdir / "memory.json").read_text())
    train_lines = [json.loads(line) for line in
                   (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in train_lines if r["split"] == "train"]
    for r in train_lines:
      curves.append({"mechanism": mechanism, "step": r["step"], "loss": round(r["loss"], 5),
                     "accuracy": round(r["accuracy"], 4),
                     "step_time_s": round(r["step_time_s"], 5)})
    summary.append({
        "mechanism": mechanism, "steps": results["step"],
        "steps_per_s": round(results["train_steps_per_s"], 3),
        "peak_memory_gib": round(memory["peak_bytes"] / 2**30, 3),
        "memory_source": memory["source"],
        "first_loss": round(train_lines[0]["loss"], 4),
        "last_loss": round(train_lines[-1]["loss"], 4),
        "val_accuracy": round(results["val"]["accuracy"], 4),
        "test_accuracy": round(results["test"]["accuracy"], 4),
        "num_params": results["num_params"], "process_wall_s": round(wall, 1)})
    print(f"[listops] {summary[-1]}", flush=True)
  if curves:
    _write_csv(out / "listops.csv", curves)
  lines = ["# ListOps, official config, 300 steps" + (" (dry run: CPU variant, 3 steps)"
                                                        if dry_run else ""), "",
           "`configs/lra/listops.py:attention=<mechanism>` with num_train_steps 300, 9,600 "
           "generated training examples, 256 validation and 256 test examples, evaluation at "
           "the end; one process per mechanism. steps/s: the train loop's own count (compile, "
           "evaluation and checkpoints excluded). Loss curves (every 10 steps): listops.csv.", "",
           *_markdown_table(summary)]
  lines += [f"- FAILED {f}" for f in failed]
  (out / "listops.md").write_text("\n".join(lines) + "\n")
  return {"ok": not failed, "summary": summary, "failed": failed}


# --------------------------------------------------------------------------------------------


def _sig(x: float) -> float:
  """x to 4 significant digits."""
  return float(f"{x:.4g}")


def _write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
  if not rows:
    return ["(no rows)"]
  columns = list(rows[0])
  return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry_run", action="store_true",
                 help="CPU backend, tiny sizes: the whole path in about a minute")
  p.add_argument("--output_dir", default=str(RESULTS))
  p.add_argument("--workdir", default=None,
                 help="training work directories (default: <output_dir>/../gpu_work, not "
                      "brought back)")
  p.add_argument("--stages", default="tests,kernels,listops",
                 help="comma-separated subset of tests, kernels, listops")
  p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 10)")
  p.add_argument("--train_one", choices=MECHANISMS, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.stages.split(",")) - {"tests", "kernels", "listops"}
  if unknown:
    p.error(f"unknown --stages {sorted(unknown)}; valid: tests, kernels, listops")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.dry_run:
    os.environ["JAX_PLATFORMS"] = "cpu"
  if args.train_one:
    train_one(args.train_one, pathlib.Path(args.workdir), args.dry_run)
    return 0
  import jax  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(args.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  workroot = pathlib.Path(args.workdir) if args.workdir else out.parent / f"{out.name}_work"
  reps = args.reps or (1 if args.dry_run else 10)
  stages = args.stages.split(",")
  lengths = [128] if args.dry_run else [1024, 2048, 4096, 8192, 16384, 32768]
  ceilings_args = (256, 4) if args.dry_run else (8192, 1024)
  heads, head_dim = (2, 16) if args.dry_run else (8, 64)
  report: dict[str, Any] = {}
  times: dict[str, float] = {}
  for stage in stages:
    start = time.time()
    try:
      if stage == "tests":
        report[stage] = run_tests(out, args.dry_run)
      elif stage == "kernels":
        report[stage] = run_kernels(out, lengths, "bfloat16", reps, ceilings_args, heads,
                                    head_dim)
      else:
        report[stage] = run_listops(out, workroot, args.dry_run)
    except Exception:  # pylint: disable=broad-except  (reported; the other stages still run)
      report[stage] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    times[stage] = time.time() - start
    print(f"[suite] {stage}: {'ok' if report[stage]['ok'] else 'FAILED'} in "
          f"{times[stage]:.0f} s", flush=True)
  device = jax.devices()[0]
  lines = ["# GPU suite" + (" (dry run on the CPU)" if args.dry_run else ""), "",
           f"Command: `python experiments/gpu/suite.py {' '.join(argv or sys.argv[1:])}`", "",
           f"Device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
           f"Python {platform.python_version()}, {os.cpu_count()} CPUs; load average at the end "
           f"{tuple(round(x, 2) for x in os.getloadavg())}.", ""]
  for stage in stages:
    result = dict(report[stage])
    lines += [f"## {stage}: {'ok' if result.pop('ok') else 'FAILED'} ({times[stage]:.0f} s)",
              "", "```", json.dumps(result, indent=1, default=str), "```", ""]
  (out / "summary.md").write_text("\n".join(lines))
  print(f"wrote {out}/summary.md; stages: " + ", ".join(
      f"{s} {'ok' if report[s]['ok'] else 'FAILED'}" for s in stages))
  return 0 if all(report[s]["ok"] for s in stages) else 1


if __name__ == "__main__":
  sys.exit(main())
