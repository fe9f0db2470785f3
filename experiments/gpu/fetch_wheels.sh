#!/usr/bin/env bash
# Downloads, here (with network), the wheels the GPU machines lack into .whl/ (git-ignored), so
# that they travel with the working tree to a machine without network (experiments/gpu/README.md).
#
#   bash experiments/gpu/fetch_wheels.sh            # then carry .whl/ with the run
#
# Python 3.12, manylinux x86_64 (the GPU image's Python), no dependencies resolved: the list
# below is complete for what clustr_jax imports on top of the image's packages (jax, flax, optax,
# orbax, chex, numpy, ...). The versions are those this project is tested with (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
mkdir -p "$DEST"
WHEELS=(
  # the data pipeline, configs and metric files
  grain==0.2.18 array-record==0.8.6 cloudpickle==3.1.3 portpicker==1.6.0
  tensorflow-datasets==4.9.10 dm-tree==0.1.10 simple-parsing==0.1.9 immutabledict==4.3.1
  ml-collections==1.1.0 tensorboardX==2.6.5
  # tokamax (memory-efficient dense attention) and what it imports
  tokamax==0.0.12 qwix==0.1.8 einshape==1.0 typeguard==2.13.3 pydantic==2.14.4
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
      -d "$DEST" "$wheel"
done
ls -l "$DEST"
du -sh "$DEST"
