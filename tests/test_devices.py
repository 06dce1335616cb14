"""The device and dtype policy, with CUDA presence, compute capability, memory and LOCAL_RANK simulated."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bvip_helpers import devices  # noqa: E402
from bvip_helpers.devices import DevicePolicyError  # noqa: E402

T4, V100, A100, L4, H100 = (7, 5), (7, 0), (8, 0), (8, 9), (9, 0)


def gpu(monkeypatch, capability=None, memory_gib=15.0, mps=False):
    """Pretend this machine has a CUDA GPU of ``capability`` and ``memory_gib`` (None: no CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as a T4 answers
        props = type("Props", (), {"total_memory": int(memory_gib * 1024**3)})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)


def test_cpu_only_machine_gets_what_the_cpu_demo_always_ran(monkeypatch):
    gpu(monkeypatch, None)
    assert devices.placement() == devices.Placement("cpu", "fp32")
    assert devices.placement().device_map is None and devices.placement().torch_dtype == torch.float32
    assert devices.mixed_precision_flags("fp32", "cpu") == {"bf16": False, "fp16": False}
    assert devices.gpu_memory_gib() is None and devices.resolve_recipe("auto") == ""


@pytest.mark.parametrize(("capability", "dtype"), [(T4, "fp16"), (V100, "fp16"), (A100, "bf16"), (L4, "bf16"),
                                                   (H100, "bf16")])
def test_auto_dtype_is_bf16_only_from_compute_capability_8(monkeypatch, capability, dtype):
    gpu(monkeypatch, capability)
    assert torch.cuda.is_bf16_supported()  # what the old code asked, and a T4 answers True (emulated)
    where = devices.placement("auto", "auto")
    assert where == devices.Placement("cuda", dtype)
    assert devices.mixed_precision_flags(where.dtype, where.device) == {"bf16": dtype == "bf16",
                                                                         "fp16": dtype == "fp16"}


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    gpu(monkeypatch, A100, mps=True)
    assert devices.resolve_device("auto") == "cuda"
    gpu(monkeypatch, None, mps=True)
    assert devices.placement() == devices.Placement("mps", "fp32")
    assert devices.device_map("mps") == {"": "mps"}
    gpu(monkeypatch, None, mps=False)
    assert devices.resolve_device("auto") == "cpu"


def test_impossible_requests_are_clear_errors(monkeypatch):
    gpu(monkeypatch, None)
    with pytest.raises(DevicePolicyError, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(DevicePolicyError, match="no Apple MPS"):
        devices.resolve_device("mps")
    with pytest.raises(DevicePolicyError, match="choose one of auto, cuda, mps, cpu"):
        devices.resolve_device("tpu")
    with pytest.raises(DevicePolicyError, match="fp16 on the CPU"):
        devices.resolve_dtype("fp16", "cpu")
    with pytest.raises(DevicePolicyError, match="choose one of auto, bf16, fp16, fp32"):
        devices.resolve_dtype("int8")
    gpu(monkeypatch, T4)
    with pytest.raises(DevicePolicyError, match=r"compute capability 8\.0 or more; this GPU has 7\.5"):
        devices.resolve_dtype("bf16", "cuda")
    assert devices.resolve_dtype("float16", "cuda:0") == "fp16"  # aliases and an index are accepted


def test_device_maps_follow_local_rank(monkeypatch):
    gpu(monkeypatch, A100)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.four_bit_device_map() == {"": 0} == devices.device_map("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")  # the fourth process of `accelerate launch`
    assert devices.four_bit_device_map() == {"": 3} == devices.device_map("cuda")
    assert devices.placement().describe() == "cuda:3, bf16"
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(DevicePolicyError, match="LOCAL_RANK='x'"):
        devices.local_rank()


@pytest.mark.parametrize(("memory", "recipe"), [(14.6, "16gb"), (15.9, "16gb"), (22.0, "24gb"), (23.6, "24gb"),
                                                (39.4, "24gb"), (79.2, "80gb"), (139.8, "80gb")])
def test_recipe_auto_reads_the_gpu_memory(monkeypatch, memory, recipe):
    gpu(monkeypatch, A100, memory_gib=memory)
    assert devices.recipe_for_memory(memory) == recipe
    assert devices.resolve_recipe("auto") == recipe
    assert devices.gpu_memory_gib() == pytest.approx(memory)


def test_named_recipes_are_checked():
    assert devices.resolve_recipe("24GB") == "24gb" and devices.resolve_recipe("") == ""
    with pytest.raises(DevicePolicyError, match="recipe '40gb'"):
        devices.resolve_recipe("40gb")


def test_short_dtype_names():
    assert devices.short_dtype(torch.bfloat16) == "bf16" and devices.short_dtype("torch.float32") == "fp32"
    with pytest.raises(DevicePolicyError, match="resolve it first"):
        devices.torch_dtype("auto")
