"""The learner's GPU path on tiny twins: fp16 and bf16 on CUDA, QLoRA 4-bit then the 16-bit merge,
``bvip predict`` on CUDA, batched generation at batch 1 and 16. Skipped without CUDA (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

from bvip_helpers import devices, families, schema, sft  # noqa: E402
from bvip_helpers.io import load_image, read_jsonl  # noqa: E402
from bvip_helpers.registry import get_spec, load_model_and_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"


def _images(n: int) -> list:
    paths = sorted((SAMPLE / "testing" / "images").glob("*.jpg")) + sorted((SAMPLE / "training" / "images").glob("*.jpg"))
    assert len(paths) >= n, f"data/sample has {len(paths)} images, {n} wanted"
    return [load_image(p) for p in paths[:n]]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_twin_trains_and_generates_on_cuda(dtype, qwen_twin, figures):
    if dtype == "bf16" and not devices.native_bf16():
        pytest.skip(f"bf16 needs compute capability 8.0; this GPU has {devices.cuda_capability()}")
    spec = get_spec(str(qwen_twin))
    model, processor = load_model_and_processor(spec, device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.dtype == devices.torch_dtype(dtype)
    images = _images(2)
    batch = families.collate_from_parts(processor, spec, images, [schema.DEFAULT_PROMPT] * 2,
                                        ["Sidewalk: left.", "Sidewalk: center. Road: right."])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    texts = families.generate_captions(model, processor, spec, images, [schema.DEFAULT_PROMPT] * 2, max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    figures[f"twin forward+backward+generate on cuda in {dtype}"] = f"loss {loss.item():.3f}"


def test_qlora_4bit_sft_then_the_16bit_merge(qwen_twin, sample_data, tmp_path, figures):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (scripts/gpu_check.sh installs it)")
    out = tmp_path / "qlora"
    torch.cuda.reset_peak_memory_stats()
    params = sft.SFTParams(model=str(qwen_twin), data_dir=str(sample_data), image_root=str(SAMPLE),
                           output_dir=str(out), method="qlora", max_steps=4, batch_size=2, lr=5e-3,
                           logging_steps=1, eval=False, merge=True, merge_check_samples=2, max_new_tokens=16,
                           gradient_checkpointing=True, seed=0)
    start = time.perf_counter()
    result = sft.train_sft(params)
    seconds = time.perf_counter() - start
    assert result.global_step == 4 and (out / "adapter_model.safetensors").is_file()
    check = result.merge_check
    assert check["device"].startswith("cuda") and check["dtype"] in {"fp16", "bf16"}
    assert check["dtype"] == devices.resolve_dtype("auto", "cuda")  # 4-bit compute dtype == the model dtype
    assert len(check["merged"]) == len(check["adapter"]) == len(check["qlora_4bit"]) == 2
    merged_config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config, "the merged model must be 16-bit, not re-quantised 4-bit"
    from safetensors import safe_open

    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"F16", "BF16"}, dtypes
    figures["qlora 4-bit: 4 steps (twin) + 16-bit merge"] = (
        f"{seconds:.1f}s, peak {torch.cuda.max_memory_allocated() / 1024**2:.0f} MiB, "
        f"merged == 16-bit base + adapter: {check['identical']}")


def test_bvip_predict_places_the_model_on_cuda(qwen_twin, sample_data, tmp_path, figures):
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "bvip_helpers", "predict", "--model", str(qwen_twin), "--jsonl",
           str(sample_data / "bvpi_sft_test.jsonl"), "--image_root", str(SAMPLE), "--out", str(out),
           "--batch_size", "8", "--max_new_tokens", "16", "--no_progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda:" in result.stderr, result.stderr[-2000:]
    expected = devices.torch_dtype(devices.resolve_dtype("auto", "cuda"))
    assert str(expected) in result.stderr
    rows = read_jsonl(out)
    assert rows and all(isinstance(r["text"], str) for r in rows)
    placed = [line for line in result.stderr.splitlines() if line.startswith("predict:") and " on cuda" in line]
    figures["bvip predict on cuda"] = placed[0] if placed else result.stderr[-200:]


def test_batched_generation_speed_at_batch_1_and_16(qwen_twin, figures):
    spec = get_spec(str(qwen_twin))
    model, processor = load_model_and_processor(spec, device="auto")
    images = _images(32)
    prompts = [schema.DEFAULT_PROMPT] * len(images)
    families.generate_captions(model, processor, spec, images[:2], prompts[:2], max_new_tokens=4)  # warm-up
    speed = {}
    for batch_size in (1, 16):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            families.generate_captions(model, processor, spec, images[i:i + batch_size], prompts[i:i + batch_size],
                                       max_new_tokens=32, min_new_tokens=32)
        torch.cuda.synchronize()
        speed[batch_size] = len(images) / (time.perf_counter() - start)
    figures["generation captions/s, 32 images x 32 new tokens (twin)"] = (
        f"batch 1: {speed[1]:.1f}, batch 16: {speed[16]:.1f}")
    assert speed[16] > speed[1], f"batching should pay on a GPU: {speed}"
