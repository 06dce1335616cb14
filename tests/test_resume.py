"""Killed at random moments, resumed, and the same output as an uninterrupted run (issue 21).

``bvip predict``, ``bvip sft`` and ``bvip dpo`` run as real processes on the committed sample
(``data/sample``) with the committed demo base (``tiny-qwen2-vl-base``) and get SIGKILL three times
each, at moments drawn from a seeded RNG: after a random amount of progress, plus a random delay, so a
kill may land in a generation step, in a write, in a training step or in a checkpoint save. Each rerun
resumes (``--resume auto`` for training); the last one finishes. The predictions file must then be
byte for byte the uninterrupted run's, and the adapter's tensors and the logged losses the
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bvip_helpers import cli
from bvip_helpers.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
MODEL = "tiny-qwen2-vl-base"
KILLS = 3

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``bvip ARGS`` as its own process group, output to a file (a full pipe would stall it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "bvip_helpers", *args], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()``; False when it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return not finished


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_predict_killed_three_times_ends_like_an_uninterrupted_run(sample_data, tmp_path):
    records = tmp_path / "records.jsonl"  # all 60 scenes of the sample
    write_jsonl(records, [r for split in ("train", "val", "test") for r in read_jsonl(sample_data / f"bvpi_sft_{split}.jsonl")])
    common = ["--model", MODEL, "--jsonl", str(records), "--image_root", str(SAMPLE), "--batch_size", "2",
              "--max_new_tokens", "48", "--no_progress"]
    straight = tmp_path / "straight.jsonl"
    assert cli.main(["predict", *common, "--out", str(straight)]) == 0
    assert _complete_lines(straight) == 60

    out, log = tmp_path / "killed.jsonl", tmp_path / "predict.log"
    rng = random.Random(21)
    thresholds = sorted(rng.sample(range(2, 50), KILLS))  # lines written before each kill
    for threshold in thresholds:
        before = _complete_lines(out)
        proc = _start(["predict", *common, "--out", str(out)], log)
        assert _kill_when(proc, lambda t=threshold: _complete_lines(out) >= t, delay=rng.uniform(0, 0.05)), \
            "the kill must land mid-run"
        assert before < _complete_lines(out) < 60, log.read_text()[-3000:]
    done = _start(["predict", *common, "--out", str(out)], log)
    assert done.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert out.read_bytes() == straight.read_bytes()
    assert not out.with_name(out.name + ".lock").exists()  # the last run removed its lock file


def _checkpoint_reached(out: Path, step: int) -> Callable[[], bool]:
    def check() -> bool:
        steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        return max(steps, default=0) >= step
    return check


def _kill_training_three_times(command: str, common: list[str], out: Path, log: Path, last_step: int) -> None:
    """Start ``bvip COMMAND`` into ``out``, kill it after three random checkpoints, then let it finish."""
    rng = random.Random(21)
    for i, step in enumerate(sorted(rng.sample(range(2, last_step, 2), KILLS))):
        proc = _start([command, *common, "--output_dir", str(out), *(["--resume", "auto"] if i else [])], log)
        assert _kill_when(proc, _checkpoint_reached(out, step), delay=rng.uniform(0, 0.3)), "the kill must land mid-run"
        assert not (out / f"{command}_result.json").exists(), log.read_text()[-3000:]
    final = log.with_suffix(".final.log")  # a kill may land before a rerun says anything; the last run must resume
    done = _start([command, *common, "--output_dir", str(out), "--resume", "auto"], final)
    assert done.wait(timeout=300) == 0, final.read_text()[-3000:]
    assert f"{command}: resuming from " in final.read_text(), final.read_text()[-3000:]


def _assert_same_run(straight: Path, killed: Path, command: str, steps: int) -> None:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    losses = [json.loads((d / f"{command}_result.json").read_text())["losses"] for d in (straight, killed)]
    assert [s for s, _ in losses[1]] == list(range(1, steps + 1))  # one loss per step, none lost or repeated
    assert [v for _, v in losses[1]] == pytest.approx([v for _, v in losses[0]], rel=1e-5)


def test_sft_killed_three_times_ends_with_the_same_adapter_and_losses(sample_data, tmp_path):
    common = ["--model", MODEL, "--data_dir", str(sample_data), "--image_root", str(SAMPLE), "--batch_size", "2",
              "--max_steps", "20", "--save_steps", "2", "--logging_steps", "1", "--lora_dropout", "0.1",
              "--eval", "false", "--merge", "false", "--seed", "0"]
    straight = tmp_path / "straight"
    assert cli.main(["sft", *common, "--output_dir", str(straight)]) == 0

    _kill_training_three_times("sft", common, tmp_path / "killed", tmp_path / "sft.log", last_step=14)
    _assert_same_run(straight, tmp_path / "killed", "sft", steps=20)


def test_dpo_killed_three_times_ends_with_the_same_adapter_and_losses(sample_data, tmp_path):
    from bvip_helpers import pairs, sft

    adapter = tmp_path / "sft"  # a short SFT run, the output layer trained in full as in the demo
    sft.train_sft(sft.SFTParams(model=MODEL, data_dir=str(sample_data), image_root=str(SAMPLE), output_dir=str(adapter),
                                max_steps=3, batch_size=4, lr=4e-3, lora_r=8, lora_alpha=8, eval=False, merge=False,
                                lora_modules_to_save="lm_head", logging_steps=1))
    made, _ = pairs.controlled_pairs(read_jsonl(sample_data / "bvpi_chat_train.jsonl"), seed=0)
    pairs.write_pairs(tmp_path / "pairs.jsonl", made)
    common = ["--model", MODEL, "--adapter", str(adapter), "--train_pairs", str(tmp_path / "pairs.jsonl"),
              "--image_root", str(SAMPLE), "--batch_size", "2", "--max_steps", "16", "--save_steps", "2",
              "--logging_steps", "1", "--lr", "5e-3", "--warmup", "0", "--seed", "0"]
    straight = tmp_path / "straight"
    assert cli.main(["dpo", *common, "--output_dir", str(straight)]) == 0
    _kill_training_three_times("dpo", common, tmp_path / "killed", tmp_path / "dpo.log", last_step=12)
    _assert_same_run(straight, tmp_path / "killed", "dpo", steps=16)
