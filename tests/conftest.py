"""Fixtures shared by the model tests: one torch thread, and tiny twins built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """CI has 2 cores; tiny models gain nothing from more threads, and one thread keeps timings stable."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_twin(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_twin(family)``: that family's twin (schema vocabulary, seed 0), built once per session."""
    from bvip_helpers.demo.twins import build_tiny_model

    root = tmp_path_factory.mktemp("twins")
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family, seed=0)
        return built[family]

    return build
