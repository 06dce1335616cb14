"""Shared notebook setup: versions, seeds, the SMOKE switch and figure style.

Every notebook's third cell is::

    from bvip_helpers.nb import notebook_setup
    SMOKE = notebook_setup(SMOKE, seed=SEED)

``BVIP_SMOKE=1`` in the environment forces smoke mode, so ``pytest --nbmake`` (which
cannot pass papermill parameters) runs each notebook in seconds on tiny data.
"""

from __future__ import annotations

import importlib
import os
import platform
import random

from bvip_helpers.io import repo_root

_VERSIONED = ("numpy", "pandas", "torch", "transformers", "trl", "peft", "PIL")


def in_colab() -> bool:
    """True inside Google Colab (Colab-only cells check this)."""
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in os.environ.get("PYTHONPATH", "")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def notebook_setup(smoke: bool = False, seed: int = 0, quiet: bool = False) -> bool:
    """Print versions, seed every RNG, style figures; return the effective SMOKE flag."""
    smoke = bool(smoke) or os.environ.get("BVIP_SMOKE", "") == "1"
    seed_everything(seed)
    try:
        import matplotlib.pyplot as plt

        plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
                             "axes.spines.top": False, "axes.spines.right": False})
    except ImportError:
        pass
    if not quiet:
        versions = []
        for name in _VERSIONED:
            try:
                versions.append(f"{name} {importlib.import_module(name).__version__}")
            except ImportError:
                versions.append(f"{name} (not installed)")
        print(f"python {platform.python_version()} | " + " | ".join(versions))
        print(f"repo root: {repo_root()} | SMOKE={smoke} | seed={seed}")
    return smoke
