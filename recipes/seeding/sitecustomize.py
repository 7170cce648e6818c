"""Seed every Python process of an Axolotl run at start-up (on PYTHONPATH only for `tools train`).

Axolotl 0.19 builds the LoRA adapter before the HF Trainer calls ``set_seed``, so the adapter's
random initialisation (and with it every later byte) differs from run to run even with the same
``seed:``. Seeding torch, numpy and ``random`` when the interpreter starts makes a run with the
same inputs and seed reproducible, which is what lets an interrupted pipeline resume to the same
outputs.
"""
import os

_seed = os.environ.get("MEDILORA_SEED")
if _seed is not None:
    import random

    random.seed(int(_seed))
    try:
        import numpy as _np
        _np.random.seed(int(_seed))
    except ImportError:
        pass
    try:
        import torch as _torch
        _torch.manual_seed(int(_seed))
    except ImportError:
        pass
