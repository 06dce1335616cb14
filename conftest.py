"""Repo-wide pytest setup: offline, smoke-sized notebooks, the optional reference data."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before any notebook kernel starts: nbmake kernels inherit this environment.
os.environ.setdefault("BVIP_SMOKE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Smoke runs must not overwrite the figures a user's demo run wrote to figures/; the folder goes at the end.
if "BVIP_FIGURES_DIR" not in os.environ:
    _TEST_FIGURES = tempfile.mkdtemp(prefix="bvip-test-figures-")
    os.environ["BVIP_FIGURES_DIR"] = _TEST_FIGURES
else:
    _TEST_FIGURES = None

REPO = Path(__file__).resolve().parent


def reference_dir() -> Path:
    """The real SENSATION CSVs (never copied into the repo); BVIP_REFERENCE_DIR overrides."""
    return Path(os.environ.get("BVIP_REFERENCE_DIR", REPO.parent / "shared" / "reference" / "sensation"))


@pytest.fixture(scope="session")
def reference_csvs() -> tuple[Path, Path]:
    """(captions_csv, annotations_csv) of the real data, or skip when absent."""
    root = reference_dir()
    captions, annotations = root / "complete_captions_sensation.csv", root / "annotations_with_obj_pos.csv"
    if not (captions.is_file() and annotations.is_file()):
        pytest.skip(f"reference CSVs not found in {root}")
    return captions, annotations


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed 60-scene synthetic sample."""
    return REPO / "data" / "sample"


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, sample_dir) -> Path:
    """data/sample built into the SFT, chat and DPO JSONL once per session: read it, never write into it."""
    if not (sample_dir / "complete_captions_sensation.csv").is_file():
        pytest.skip("data/sample not found")
    from bvip_helpers.dataset import build_dataset

    out = tmp_path_factory.mktemp("bvpi_sample")
    build_dataset(sample_dir / "complete_captions_sensation.csv", sample_dir / "annotations_with_obj_pos.csv", out,
                  image_root=sample_dir, show_progress=False)
    return out


def pytest_sessionfinish(session, exitstatus):
    """Remove the figures the smoke runs wrote (only the folder this session made)."""
    if _TEST_FIGURES:
        shutil.rmtree(_TEST_FIGURES, ignore_errors=True)
