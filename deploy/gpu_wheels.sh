#!/usr/bin/env bash
# Fetch, on a machine with pip and a package index, the wheels that the GPU checks need and a bare
# device machine lacks, into <repo>/.whl (git-ignored). The device image has Python 3.12, torch,
# numpy, scipy, pillow, tqdm and rich, but none of the DICOM stack; its machine reaches no index.
#
#   deploy/gpu_wheels.sh            # then: carry .whl to the device and run deploy/gpu_checks.sh there
#
# Versions: the ones this project is tested with; PYTHON_VERSION (default 3.12) is the device's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${PYTHON_VERSION:-3.12}"
wheels=(
    highdicom==0.28.2 pydicom==3.0.2 structlog==26.1.0
    pyjpegls==1.5.1 pylibjpeg==2.1.0 pylibjpeg-libjpeg==2.5.0 pylibjpeg-openjpeg==2.6.0
    pylibjpeg-rle==2.2.0 python-gdcm==3.2.6
)
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"
ls -1 .whl
du -sh .whl
