#!/usr/bin/env bash
# MatterSim's requirements pull torchvision and torchaudio, which it never uses; their
# PyPI wheels are CUDA builds whose operators do not load with the CPU torch, and
# torchmetrics (imported by MatterSim) imports torchvision when it is installed and
# then fails. Remove both; torchmetrics runs without them.
set -euo pipefail
"$1" -m pip uninstall --yes --quiet torchvision torchaudio
