"""Network facts the torch-free inference path needs (importing network.py would import torch)."""
from __future__ import annotations

#: Three 2x2x2 max-pools: network inputs must be divisible by this (the torch model pads; exported graphs do not).
DOWNSAMPLING_FACTOR = 8
