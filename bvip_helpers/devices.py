"""One device and dtype policy for loading, training and generating, used by every stage.

* ``device="auto"`` is CUDA when present, else Apple's MPS, else the CPU.
* ``dtype="auto"`` is bf16 on a GPU of compute capability 8.0 or more (A100, L4, RTX 30xx/40xx, H100),
  fp16 on older GPUs (T4, V100: ``torch.cuda.is_bf16_supported()`` answers True on a T4, where bf16
  is only emulated and slow), and fp32 on the CPU and on MPS (where mixed precision training is not
  supported by the Trainer).
* A 4-bit (QLoRA) base computes in the model's dtype, and sits on the GPU of its own process
  (``LOCAL_RANK`` under ``accelerate launch``), never on GPU 0 for every rank.
* Recipes: ``--recipe auto`` reads the GPU's memory and picks the registry's 16, 24 or 80 GB recipe.

On a machine without a GPU the policy is what the CPU demo always ran: fp32 weights on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")
#: spellings accepted for a dtype, mapped to the short name.
DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "fp32": "fp32", "float32": "fp32", "float": "fp32", "auto": "auto"}
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: compute capability from which bf16 runs natively (Ampere).
BF16_MIN_CAPABILITY = (8, 0)
#: ``--recipe`` choices; ``auto`` picks one from the GPU memory (:func:`recipe_for_memory`).
RECIPES = ("16gb", "24gb", "80gb")


class DevicePolicyError(ValueError):
    """A device or dtype this machine cannot give (e.g. ``cuda`` without a GPU, bf16 on a T4)."""


def _torch() -> Any:
    import torch

    return torch


def mps_available() -> bool:
    torch = _torch()
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def local_rank() -> int:
    """This process's GPU index under ``accelerate launch`` / ``torchrun`` (``LOCAL_RANK``), 0 otherwise."""
    value = os.environ.get("LOCAL_RANK", "0") or "0"
    try:
        return int(value)
    except ValueError as err:
        raise DevicePolicyError(f"LOCAL_RANK={value!r} is not an integer; unset it or launch with accelerate") from err


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` | ``mps`` | ``cpu``; an explicit device is checked against the machine."""
    torch = _torch()
    choice = (device or "auto").lower()
    if choice.startswith("cuda:"):
        choice = "cuda"  # the index comes from LOCAL_RANK; one process drives one GPU
    if choice not in DEVICES:
        raise DevicePolicyError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DevicePolicyError("device 'cuda' was asked for but torch sees no CUDA GPU "
                                f"(torch {torch.__version__}); use --device auto or cpu (a GPU needs an NVIDIA driver and a CUDA build of torch)")
    if choice == "mps" and not mps_available():
        raise DevicePolicyError("device 'mps' was asked for but this machine has no Apple MPS backend; use --device auto")
    return choice


def cuda_capability(index: int | None = None) -> tuple[int, int]:
    """(major, minor) compute capability of GPU ``index`` (default: this process's, :func:`local_rank`)."""
    torch = _torch()
    return tuple(torch.cuda.get_device_capability(local_rank() if index is None else index))  # type: ignore[return-value]


def native_bf16(index: int | None = None) -> bool:
    """True where bf16 runs in hardware: compute capability 8.0 or more (not emulated, as on a T4)."""
    return cuda_capability(index) >= BF16_MIN_CAPABILITY


def resolve_dtype(dtype: str = "auto", device: str = "auto") -> str:
    """``auto`` -> the policy's dtype for ``device``; an explicit one is checked (``bf16``/``fp16``/``fp32``)."""
    name = DTYPE_ALIASES.get(str(dtype or "auto").lower())
    if name is None:
        raise DevicePolicyError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    if name == "auto":
        if target == "cuda":
            return "bf16" if native_bf16() else "fp16"
        return "fp32"
    if name == "bf16" and target == "cuda" and not native_bf16():
        major, minor = cuda_capability()
        raise DevicePolicyError(f"bf16 needs compute capability 8.0 or more; this GPU has {major}.{minor} "
                                "(a T4 or V100 only emulates bf16, slowly). Use --dtype fp16 or auto")
    if name == "fp16" and target == "cpu":
        raise DevicePolicyError("fp16 on the CPU is not supported for training and is slow for generation; "
                                "use --dtype fp32 (or auto) on the CPU")
    return name


def torch_dtype(name: str) -> Any:
    """``bf16`` / ``fp16`` / ``fp32`` (or an alias) -> the ``torch.dtype``."""
    short = DTYPE_ALIASES.get(str(name).lower())
    if short is None or short == "auto":
        raise DevicePolicyError(f"dtype {name!r}: resolve it first (resolve_dtype); choose bf16, fp16 or fp32")
    return getattr(_torch(), _TORCH_NAMES[short])


def short_dtype(value: Any) -> str:
    """A ``torch.dtype`` (or a name) -> ``bf16`` / ``fp16`` / ``fp32`` (other dtypes by their torch name)."""
    text = str(value).replace("torch.", "")
    return DTYPE_ALIASES.get(text, text)


def device_map(device: str) -> dict[str, Any] | None:
    """Where ``from_pretrained`` puts the weights: this process's GPU, MPS, or ``None`` (stay on the CPU)."""
    if device == "cuda":
        return {"": local_rank()}
    if device == "mps":
        return {"": "mps"}
    return None


def four_bit_device_map() -> dict[str, int]:
    """A 4-bit model must be placed while loading: on this process's GPU (``LOCAL_RANK``), one copy per rank."""
    return {"": local_rank()}


def mixed_precision_flags(dtype: str, device: str) -> dict[str, bool]:
    """The Trainer's ``bf16`` / ``fp16`` flags for a run in ``dtype`` on ``device`` (none on the CPU or MPS)."""
    on_gpu = device == "cuda"
    return {"bf16": on_gpu and dtype == "bf16", "fp16": on_gpu and dtype == "fp16"}


def gpu_memory_gib(index: int | None = None) -> float | None:
    """Total memory of GPU ``index`` (default: this process's) in GiB, or ``None`` without CUDA."""
    torch = _torch()
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(local_rank() if index is None else index).total_memory / 1024**3


def recipe_for_memory(memory_gib: float) -> str:
    """The registry recipe a GPU of ``memory_gib`` takes: under 20 GiB -> 16gb, under 40 -> 24gb, else 80gb.

    A 16 GB card reports about 14.6-15.9 GiB, a 24 GB card 22-23.6, a 40 GB A100 39.4 (24gb recipe),
    an 80 GB card 79-80.
    """
    if memory_gib < 20:
        return "16gb"
    return "24gb" if memory_gib < 40 else "80gb"


def resolve_recipe(recipe: str) -> str:
    """``""`` (none), ``auto`` (from this GPU's memory; none without CUDA) or one of :data:`RECIPES`."""
    choice = (recipe or "").lower()
    if choice in ("", "none"):
        return ""
    if choice == "auto":
        memory = gpu_memory_gib()
        return "" if memory is None else recipe_for_memory(memory)
    if choice not in RECIPES:
        raise DevicePolicyError(f"recipe {recipe!r}: choose auto, {', '.join(RECIPES)} or '' (none)")
    return choice


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in which dtype, resolved from ``device`` / ``dtype`` requests."""

    device: str  # cuda | mps | cpu
    dtype: str  # bf16 | fp16 | fp32

    @property
    def torch_dtype(self) -> Any:
        return torch_dtype(self.dtype)

    @property
    def device_map(self) -> dict[str, Any] | None:
        return device_map(self.device)

    def describe(self) -> str:
        where = f"cuda:{local_rank()}" if self.device == "cuda" else self.device
        return f"{where}, {self.dtype}"


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """The policy's answer for one model: ``placement("auto", "auto")`` on a T4 is ``cuda, fp16``."""
    target = resolve_device(device)
    return Placement(target, resolve_dtype(dtype, target))
