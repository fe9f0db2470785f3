r"""Parameters and FLOPs of ClusTR-T/S/B + Semantic FPN at 512 x 512 (ADE20K, 150 classes), beside
PVT's and PVTv2's reported Semantic FPN figures, and the DPC-kNN clustering's share of the
ClusTR-T backbone's forward time at 512 x 512 (16,384 stage-1 tokens).

Counting: parameters from ``jax.eval_shape`` of ``init``; FLOPs from XLA's cost analysis of the
lowered eval forward (batch 1, nothing runs), which counts a multiply-add as 2 and counts every
operation (the clustering's distance matrices, attention products, resizes); GMAC = GFLOP / 2 is
the papers' convention (mmcv's ``get_flops`` counts multiply-adds of conv and linear layers and
leaves the attention products out, so the reported figures are lower for the same network;
``docs/clustr.md``, "Cost"). Reported figures: PVT (Wang et al. ICCV 2021, Table 3, Semantic FPN
on ADE20K) and PVTv2 (Wang et al. CVMJ 2022, Table 4), whose b1/b2/b3 pyramids ClusTR-T/S/B
follow (same widths and depths; ``docs/vision.md``).

Timing (``--timing``): the jitted ClusTR-T backbone forward (``features_only``) at batch 1 and
the jitted ``dpc_knn_cluster`` alone on each clustered stage's tokens (random normal, the stage's
width), times the stage's depth; median of ``--repeats`` runs after a warm-up. On a shared CPU
the numbers are taken under load.

  python experiments/segmentation/model_table.py            # -> results/model_table.{md,csv}
  python experiments/segmentation/model_table.py --timing   # -> results/clustering_share.md
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import models
from clustr_jax.attention import clustr as clustr_attention
from clustr_jax.models import clustr_vit

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "segmentation" / "results"
SIZE = 512
MODELS = [  # (label, registry name, options, reported figures of the matching PVT pyramid)
    ("ClusTR-T + FPN", "clustr_t_fpn", {}, "PVTv2-b1 + FPN: 17.8M / 34.2G / 42.5 mIoU; "
                                           "PVT-Tiny + FPN: 17.0M / 33.2G / 35.7"),
    ("ClusTR-T + FPN, dense stages 1-3", "clustr_t_fpn", {"attention": "dense"}, "-"),
    ("ClusTR-S + FPN", "clustr_s_fpn", {}, "PVTv2-b2 + FPN: 29.1M / 45.8G / 45.2; "
                                           "PVT-Small + FPN: 28.2M / 44.5G / 39.8"),
    ("ClusTR-B + FPN", "clustr_b_fpn", {}, "PVTv2-b3 + FPN: 49.0M / 62.4G / 47.3; "
                                           "PVT-Medium + FPN: 48.0M / 61.0G / 41.6"),
]


def count_and_flops(name: str, options: dict) -> tuple[int, int, float]:
  """(all parameters, backbone parameters, XLA FLOPs of one eval forward at 512 x 512)."""
  model = models.get(name, num_classes=150, **options)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  count = lambda tree: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))  # noqa: E731
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return count(variables), count(variables["params"]["backbone"]), float(cost["flops"])


def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def timing(repeats: int) -> list[str]:
  """The clustering's share of the ClusTR-T backbone's forward time at 512 x 512."""
  variant = clustr_vit.VARIANTS["b1"]
  backbone = models.get("clustr_t", num_classes=0, features_only=True)
  x = jax.random.normal(jax.random.key(0), (1, SIZE, SIZE, 3))
  params = jax.jit(backbone.init)(jax.random.key(0), x)
  total = _median_time(jax.jit(lambda p, x: backbone.apply(p, x)), params, x, repeats=repeats)
  rows, clustering = [], 0.0
  for i in range(3):
    side = SIZE // (4 * 2 ** i)
    tokens, sr = side * side, variant["sr_ratios"][i]
    m = tokens // sr ** 2
    h = jax.random.normal(jax.random.key(i), (1, tokens, variant["embed_dims"][i]))
    fn = jax.jit(lambda h, m=m: clustr_attention.dpc_knn_cluster(h, None, (m, 4 * m)))
    t = _median_time(fn, h, repeats=repeats)
    clustering += t * variant["depths"][i]
    rows.append(f"| {i + 1} | {tokens:,} | {m}, {4 * m} | {variant['depths'][i]} | "
                f"{t * 1e3:.1f} | {t * variant['depths'][i] * 1e3:.1f} |")
  load = os.getloadavg()
  return ["# DPC-kNN clustering's share of ClusTR-T's backbone time at 512 x 512", "",
          f"`python experiments/segmentation/model_table.py --timing --repeats={repeats}` "
          f"(jax {jax.__version__}, {platform.machine()} CPU, batch 1, float32, median of "
          f"{repeats}; shared machine, load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} at the end: timings under load).", "",
          f"Backbone forward (4 stages, features_only): {total * 1e3:.0f} ms. Clustering of "
          f"stages 1-3 (every block clusters once): {clustering * 1e3:.0f} ms = "
          f"**{100 * clustering / total:.0f}%** of the backbone's time.", "",
          "| stage | tokens | clusters (2 scales) | blocks | one clustering (ms) | "
          "stage total (ms) |", "|---|---|---|---|---|---|", *rows, ""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--timing", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  RESULTS.mkdir(parents=True, exist_ok=True)
  if args.timing:
    lines = timing(args.repeats)
    (RESULTS / "clustering_share.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return
  rows = []
  for label, name, options, reported in MODELS:
    params, backbone, flops = count_and_flops(name, options)
    rows.append({"model": label, "registry": name, "options": options or "",
                 "params": params, "params_M": round(params / 1e6, 2),
                 "backbone_params_M": round(backbone / 1e6, 2),
                 "xla_GFLOP": round(flops / 1e9, 1), "xla_GMAC": round(flops / 2e9, 1),
                 "reported": reported})
    print(rows[-1], flush=True)
  with open(RESULTS / "model_table.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["# ClusTR + Semantic FPN at 512 x 512: parameters and FLOPs", "",
           f"`python experiments/segmentation/model_table.py` (jax {jax.__version__}; XLA cost "
           "analysis of the lowered eval forward, batch 1, 512 x 512, 150 classes; GMAC = XLA "
           "GFLOP / 2). Reported: params / GFLOPs (MACs, mmcv count) / ADE20K val mIoU of the "
           "PVT pyramid with the same widths and depths (PVT Table 3, PVTv2 Table 4).", "",
           "| model | parameters | backbone | XLA GFLOP | XLA GMAC | reported (PVT family) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['params']:,} ({r['params_M']}M) | "
                 f"{r['backbone_params_M']}M | {r['xla_GFLOP']} | {r['xla_GMAC']} | "
                 f"{r['reported']} |")
  lines += ["", "XLA's count includes the DPC-kNN distance matrices (N^2 C per clustering: "
            "16,384^2 x 64 at stage 1), the attention products and the resizes, which mmcv's "
            "count leaves out; the dense-stage row shows the pyramid without clustering.", ""]
  (RESULTS / "model_table.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
