"""tests/gpu: the real-GPU path (device placement, fp16/bf16, QLoRA 4-bit, batched generation) on tiny twins.

Every test here is marked ``gpu`` and skipped, with the reason, where torch sees no CUDA GPU, so the
folder runs cleanly in the CPU suite. Run it on a GPU with ``make test-gpu`` or ``scripts/gpu_check.sh``
(which also installs bitsandbytes and writes the figures to ``$OUT``). The figures (captions per
second, step times, peak memory) are printed at the end and written to ``$BVIP_GPU_FIGURES`` if set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLE = REPO / "data" / "sample"
FIGURES: dict[str, object] = {}


def no_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU (torch {torch.__version__} sees none): tests/gpu run where torch.cuda.is_available(), "
                "e.g. `make test-gpu` or scripts/gpu_check.sh on a CUDA machine")
    return None


def pytest_collection_modifyitems(config, items):
    reason = no_cuda_reason()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES:
        return
    terminalreporter.write_sep("=", "GPU figures (measured)")
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key}: {value}")
    target = os.environ.get("BVIP_GPU_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2, default=str) + "\n", encoding="utf-8")
        terminalreporter.write_line(f"figures written to {target}")


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    """Record a measured figure: ``figures["name"] = value`` (printed and written at the end)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        FIGURES.setdefault("gpu", f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, "
                                  f"compute capability {props.major}.{props.minor}, torch {torch.__version__}")
    return FIGURES


@pytest.fixture(scope="session")
def qwen_twin(tmp_path_factory, sample_data) -> Path:
    from bvip_helpers.demo.twins import build_tiny_model

    return build_tiny_model("qwen2-vl", tmp_path_factory.mktemp("gpu_twins") / "tiny-qwen2-vl",
                            data_dir=sample_data, seed=0)
