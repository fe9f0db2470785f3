r"""Parameters and FLOPs of ClusTR-T/S/B + Semantic FPN at 512 x 512 (ADE20K, 150 classes), beside
PVT's and PVTv2's reported Semantic FPN figures, and the DPC-kNN clustering's share of the
ClusTR-T backbone's forward time at 512 x 512 (16,384 stage-1 tokens).

Counting (computed from shapes; nothing runs): parameters from ``jax.eval_shape`` of ``init``;
multiply-accumulates in mmcv's convention (``mmcv_flops.py``; the papers' ``get_flops.py``)
with and without PVT's hand-added ``sra_flops`` attention term (PVT ``classification/
get_flops.py`` / ``detection/get_flops.py``; the same function in ClusTR's ``get_flops.py``),
and with the attention products our layers actually compute; XLA's cost analysis of the lowered
eval forward (a multiply-add counts 2; every operation, the clustering included). A check row
reproduces the official ClusTR classifiers' FLOPs at 224 x 224 (``ClusTR.py`` comments).
Reported figures: PVT (Wang et al. ICCV 2021, Table 3, Semantic FPN on ADE20K) and PVTv2 (Wang
et al. CVMJ 2022, Table 4) b1/b2/b3, whose names the ClusTR code reuses. The pyramids are not the
same: PVTv2-b1/b2/b3 (= PVT-Tiny/Small/Medium) have widths (64, 128, 320, 512) and depths
(2, 2, 2, 2) / (3, 4, 6, 3) / (3, 4, 18, 3) (``whai362/PVT`` ``classification/pvt_v2.py``),
ClusTR-T/S/B (64, 128, 256 | 256 | 320, 512) and (1, 2, 6, 1) / (3, 5, 13, 2) / (3, 5, 18, 3).

Timing (``--timing``): the jitted ClusTR-T backbone forward (``features_only``) at batch 1 and
the jitted ``dpc_knn_cluster`` alone on each clustered stage's tokens (random normal, the stage's
width), times the stage's depth; median of ``--repeats`` runs after a warm-up; the output
records the load average (timings are claims only when it shows the machine to itself).

  python experiments/segmentation/model_table.py            # -> results/model_table.{md,csv}
  python experiments/segmentation/model_table.py --timing   # -> results/clustering_share.md
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import models
from clustr_jax.attention import clustr as clustr_attention
from clustr_jax.models import clustr_vit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # noqa: E402
import mmcv_flops  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "segmentation" / "results"
SIZE = 512
MODELS = [  # (label, registry name, options, backbone variant)
    ("ClusTR-T + FPN", "clustr_t_fpn", {}, "b1"),
    ("ClusTR-T + FPN, dense stages 1-3", "clustr_t_fpn", {"attention": "dense"}, "b1"),
    ("ClusTR-S + FPN", "clustr_s_fpn", {}, "b2"),
    ("ClusTR-B + FPN", "clustr_b_fpn", {}, "b3"),
]
#: Reported Semantic FPN figures on ADE20K (params M, GFLOPs at 512 x 512, val mIoU) of the PVT
#: pyramids of the same names and size classes (not the same widths and depths; module
#: docstring): PVTv2 (Wang et al., CVMJ 2022, Table 4) b1/b2/b3; PVT (Wang et al., ICCV 2021,
#: Table 3) Tiny/Small/Medium.
REPORTED = {
    "b1": "PVTv2-b1: 17.8M / 34.2G / 42.5; PVT-Tiny: 17.0M / 33.2G / 35.7",
    "b2": "PVTv2-b2: 29.1M / 45.8G / 45.2; PVT-Small: 28.2M / 44.5G / 39.8",
    "b3": "PVTv2-b3: 49.0M / 62.4G / 47.3; PVT-Medium: 48.0M / 61.0G / 41.6",
}
#: The official ClusTR classifiers' FLOPs at 224 x 224 (``YtongXie/ClusTR`` ``ClusTR.py``,
#: trailing comments, printed by its ``get_flops.py``), the check of the convention.
OFFICIAL_CLASSIFIER = {"clustr_t": ("b1", 2.15), "clustr_s": ("b2", 4.8), "clustr_b": ("b3", 7.48)}


def sra_flops(size: int, variant: dict) -> int:
  """PVT's hand-added attention term for one pyramid at ``size`` x ``size``: sum over stages of
  2 (H / s_i)(W / s_i)(H / s_i / r_i)(W / s_i / r_i) C_i x depth_i (official ``get_flops.py``
  ``sra_flops``: the MACs of Q K^T and A V with PVT's spatially reduced keys)."""
  out = 0
  for i, stride in enumerate((4, 8, 16, 32)):
    h = size // stride
    r, dim = variant["sr_ratios"][i], variant["embed_dims"][i]
    out += 2 * h * h * (h // r) * (h // r) * dim * variant["depths"][i]
  return out


def attention_products(calls: list[mmcv_flops.Call]) -> int:
  """The MACs of Q K^T and A V that our attention layers actually compute, 2 N_q N_k H d per
  key set, from the recorded projections: queries ``q`` / ``query`` [B, N, H, d], keys
  ``kv1`` / ``kv2`` (ClusTR's two cluster scales) or ``key`` [B, N_k, H, d] of the same layer."""
  queries = {c.path.rpartition("/")[0]: c.output_shape for c in calls
             if c.path.rpartition("/")[2] in ("q", "query")}
  out = 0
  for c in calls:
    layer, _, name = c.path.rpartition("/")
    if name in ("key", "kv1", "kv2", "kv"):
      batch, n, heads, dim = queries[layer]
      out += 2 * batch * n * c.output_shape[1] * heads * dim
  return out


def head_functional_terms(calls: list[mmcv_flops.Call]) -> int:
  """mmcv's count of the FPN head modules we compute functionally: mmsegmentation's ``FPNHead``
  has an ``nn.ReLU`` after each GroupNorm (numel) and an ``nn.Upsample`` (x2, numel of its
  output = 4 x the norm's numel) in each stage of the levels above stride 4."""
  out = 0
  for c in calls:
    if c.kind == "GroupNorm" and c.path.startswith("head/"):
      numel = int(np.prod(c.input_shape))
      level = int(c.path.split("/")[1].split("_")[0].removeprefix("scale"))
      out += numel + (4 * numel if level > 1 else 0)
  return out


def count_and_flops(name: str, options: dict, size: int = SIZE) -> dict:
  """Parameters and operation counts of one eval forward at ``size`` x ``size`` (batch 1).

  Returns a dict: ``params``, ``backbone_params`` (the segmentation models' backbone subtree;
  all parameters for a classifier), ``mmcv`` (the modules' MACs in mmcv's convention,
  ``mmcv_flops`` plus ``head_functional_terms``), ``attention`` (``attention_products``),
  ``xla`` (XLA's FLOP count of the lowered program).
  """
  segmentation = name.endswith("_fpn")
  model = models.get(name, num_classes=150 if segmentation else 1000, **options)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  count = lambda tree: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))  # noqa: E731
  apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  calls = mmcv_flops.count_macs(apply, variables, x)
  cost = jax.jit(apply).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = variables["params"]
  return {"params": count(variables),
          "backbone_params": count(params["backbone"] if segmentation else params),
          "mmcv": mmcv_flops.total(calls) + head_functional_terms(calls),
          "attention": attention_products(calls), "xla": float(cost["flops"])}


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
          f"{repeats}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end: "
          f"the run's own threads make about 2).", "",
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
  for label, name, options, variant in MODELS:
    c = count_and_flops(name, options)
    sra = sra_flops(SIZE, clustr_vit.VARIANTS[variant])
    rows.append({"model": label, "registry": name, "options": options or "",
                 "params": c["params"], "params_M": round(c["params"] / 1e6, 2),
                 "backbone_params_M": round(c["backbone_params"] / 1e6, 2),
                 "mmcv_GMAC": round(c["mmcv"] / 1e9, 2),
                 "official_GMAC": round((c["mmcv"] + sra) / 1e9, 2),
                 "actual_attention_GMAC": round((c["mmcv"] + c["attention"]) / 1e9, 2),
                 "xla_GFLOP": round(c["xla"] / 1e9, 1),
                 "reported": REPORTED[variant] if not options else "-"})
    print(rows[-1], flush=True)
  checks = []
  for name, (variant, reported) in OFFICIAL_CLASSIFIER.items():
    c = count_and_flops(name, {}, size=224)
    sra = sra_flops(224, clustr_vit.VARIANTS[variant])
    checks.append(f"| {name} ({variant}) | {c['params']:,} | {c['mmcv'] / 1e9:.3f} | "
                  f"{sra / 1e9:.3f} | {(c['mmcv'] + sra) / 1e9:.3f} | {reported} |")
    print(checks[-1], flush=True)
  with open(RESULTS / "model_table.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = ["# ClusTR + Semantic FPN at 512 x 512: parameters and FLOPs", "",
           f"`python experiments/segmentation/model_table.py` (jax {jax.__version__}; batch 1, "
           "512 x 512, 150 classes; computed from shapes, nothing timed).", "",
           "- **mmcv**: multiply-accumulates of the layers mmcv's `get_model_complexity_info` "
           "hooks (`mmcv_flops.py`): conv (with bias), linear, LayerNorm / GroupNorm (x2, "
           "affine), and the FPN head's ReLU and x2 `nn.Upsample`; no attention products, no "
           "clustering, no GELU, no functional resizes.",
           "- **official**: mmcv + PVT's hand-added `sra_flops` term (2 N (N / r^2) C per "
           "block), the convention of PVT's and ClusTR's `get_flops.py`; it reproduces the "
           "official ClusTR classifiers' figures (below). For ClusTR it counts N / r^2 keys per "
           "block, although ClusTR attends to N / r^2 + 4 N / r^2 cluster tokens. This is the "
           "column to set beside the reported figures.",
           "- **mmcv + actual attention**: mmcv + 2 N_q N_k C of every attention layer with the "
           "keys it really uses (ClusTR's two cluster scales; all N tokens in dense stages).",
           "- **XLA GFLOP**: XLA's cost analysis of the lowered eval forward; a multiply-add is "
           "2 FLOPs, and it counts everything (the DPC-kNN distance matrices, N^2 C per "
           "clustering, 16,384^2 x 64 in stage 1; softmax; resizes).",
           "- **reported**: params / GFLOPs (MACs, the official convention) / ADE20K val mIoU of "
           "Semantic FPN on the PVT pyramids of the same names (PVTv2 Table 4, PVT Table 3). "
           "They are not the same networks: PVTv2-b1/b2/b3 (and PVT-Tiny/Small/Medium) have "
           "widths (64, 128, 320, 512) and depths (2, 2, 2, 2) / (3, 4, 6, 3) / (3, 4, 18, 3); "
           "ClusTR-T/S/B have stage-3 widths 256 / 256 / 320 and depths (1, 2, 6, 1) / "
           "(3, 5, 13, 2) / (3, 5, 18, 3).", "",
           "| model | parameters | backbone | mmcv GMAC | official GMAC | mmcv + actual "
           "attention GMAC | XLA GFLOP | reported (PVT family, Semantic FPN) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['params']:,} ({r['params_M']}M) | "
                 f"{r['backbone_params_M']}M | {r['mmcv_GMAC']} | {r['official_GMAC']} | "
                 f"{r['actual_attention_GMAC']} | {r['xla_GFLOP']} | {r['reported']} |")
  lines += ["", "The official column of the dense-stage row uses the same `sra_flops` term; its "
            "actual attention (all 16,384 stage-1 keys) is in the next column.", "",
            "Check of the convention on the ClusTR classifiers at 224 x 224 (1000 classes): "
            "mmcv modules plus `sra_flops` against the figures in the official `ClusTR.py`.", "",
            "| model | parameters | mmcv GMAC | sra_flops GMAC | mmcv + sra_flops | official |",
            "|---|---|---|---|---|---|", *checks, ""]
  (RESULTS / "model_table.md").write_text("\n".join(lines))
  print("\n".join(lines))

if __name__ == "__main__":
  main()
