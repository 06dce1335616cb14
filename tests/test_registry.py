"""Model registry: entries, lookup, loading guards, LoRA targets against real module names, docs in sync."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from bvip_helpers import registry
from bvip_helpers.io import repo_root
from bvip_helpers.registry import MODELS, get_spec, load_model_and_processor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HF_NATIVE = [s for s in MODELS.values()
             if not s.is_export_only and not s.name.startswith("tiny-") and s.backend == "transformers"]
QWEN_SIZE = {"shortest_edge": 256 * 28 * 28, "longest_edge": 640 * 28 * 28}


def test_every_family_has_a_real_model_and_a_tiny_twin():
    assert set(registry.FAMILIES) == set(registry.FAMILY_REFERENCE)
    for family in registry.FAMILIES:
        twin = MODELS[f"tiny-{family}"]
        assert twin.hub_id == f"runs/models/tiny-{family}" and twin.is_local and twin.family == family
        reference = MODELS[registry.FAMILY_REFERENCE[family]]
        assert (twin.model_class, twin.trainer, twin.prompt_style) == (
            reference.model_class, reference.trainer, reference.prompt_style)
    assert registry.DEFAULT_MODEL == "tiny-qwen2-vl" in MODELS


def test_trainer_and_prompt_rules():
    for spec in HF_NATIVE:
        expected = "trl_sft" if spec.family in registry.DECODER_ONLY else "collator_trainer"
        expected = "zero-shot" if spec.is_zero_shot_only else expected
        assert spec.trainer == expected, spec.name
        assert spec.prompt_style in ("chat", "prefix", "none")
        assert (spec.task_prefix is not None) == (spec.prompt_style == "prefix"), spec.name
        assert set(spec.recipes) == {"16gb", "24gb", "80gb"} and not spec.trust_remote_code_needed
        assert spec.licence and not spec.is_local
    assert MODELS["paligemma2-3b"].task_prefix == "caption en"
    assert MODELS["paligemma2-3b"].hub_id == "google/paligemma2-3b-pt-224"
    assert MODELS["florence2-base"].task_prefix.startswith("<") and MODELS["blip-base"].prompt_style == "none"


def test_hf_native_classes_exist_in_transformers():
    import transformers

    for spec in HF_NATIVE:
        assert hasattr(transformers, spec.model_class), spec.model_class
        assert hasattr(transformers, spec.processor_class), spec.processor_class


def test_export_only_entries():
    exports = {s.name: s for s in MODELS.values() if s.is_export_only}
    assert {"internvl2-1b", "openflamingo-3b", "mobilevlm-v2-1.7b", "moondream2"} <= set(exports)
    from bvip_helpers.exporters import EXPORTERS

    for spec in exports.values():
        assert spec.exporter is None or spec.exporter in EXPORTERS
        assert spec.family is None and spec.lora_target_modules is None
    assert exports["moondream2"].trust_remote_code_needed and exports["internvl2-1b"].exporter == "internvl"


def test_get_spec_by_name_hub_id_and_unknown():
    assert get_spec("qwen2-vl-2b") is MODELS["qwen2-vl-2b"]
    assert get_spec("qwen/qwen2-vl-2b-instruct").name == "qwen2-vl-2b"
    with pytest.raises(registry.UnknownModelError, match="Known names: .*tiny-qwen2-vl"):
        get_spec("no-such-model")


def test_get_spec_infers_family_from_a_local_dir(tmp_path):
    ckpt = tmp_path / "my-smol"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "idefics3",
                                                  "architectures": ["Idefics3ForConditionalGeneration"]}))
    spec = get_spec(str(ckpt))
    assert spec.family == "smolvlm" and spec.hub_id == str(ckpt) and spec.is_local
    assert spec.model_class == "Idefics3ForConditionalGeneration" and spec.trainer == "trl_sft"

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "google/paligemma2-3b-pt-224"}))
    assert get_spec(str(adapter)).name == "paligemma2-3b"

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(registry.UnknownModelError, match="'bert' is not a registry family"):
        get_spec(str(odd))


def test_a_local_twin_folder_keeps_its_own_image_size(tmp_path):
    """A folder with twin_meta.json (a twin or a model trained from one) must not get the hub model's budget."""
    from bvip_helpers.demo import twins
    assert registry.TWIN_META_FILE == twins.META_FILE
    folder = tmp_path / "tiny-qwen2-vl-base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert get_spec(str(folder)).image_budget == MODELS["qwen2-vl-2b"].image_budget != {}  # a real checkpoint
    (folder / registry.TWIN_META_FILE).write_text("{}")
    spec = get_spec(str(folder))
    assert spec.family == "qwen2-vl" and spec.image_budget == {}
    adapter = tmp_path / "adapter"  # an adapter trained on the twin resolves to it, budget and all
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
    assert get_spec(str(adapter)).image_budget == {}


def test_tiny_qwen2_vl_base_is_a_registry_entry(tmp_path, monkeypatch):
    spec = get_spec("tiny-qwen2-vl-base")
    assert spec.hub_id == "models/tiny-qwen2-vl-base" and spec.is_local and spec.family == "qwen2-vl"
    assert spec.image_budget == {} and spec.model_class == MODELS["tiny-qwen2-vl"].model_class
    assert get_spec("models/tiny-qwen2-vl-base") is spec
    monkeypatch.setenv("BVIP_ROOT", str(tmp_path))  # not there: the error says how to get it back
    with pytest.raises(FileNotFoundError, match="make demo-base"):
        registry.model_source(spec)


def test_loader_refuses_export_only_remote_code_and_cpu_4bit(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="export-only.*bvip export --format moondream"):
        load_model_and_processor("moondream2", trust_remote_code=True)
    remote = registry.replace(MODELS["qwen2-vl-2b"], trust_remote_code_needed=True)
    with pytest.raises(ValueError, match="needs trust_remote_code=True"):
        load_model_and_processor(remote)
    monkeypatch.setenv("BVIP_ROOT", str(tmp_path))  # no runs/models there
    with pytest.raises(FileNotFoundError, match="bvip tiny-model --family qwen2-vl"):
        load_model_and_processor("tiny-qwen2-vl")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            registry._four_bit_config(None)


@pytest.mark.slow
def test_loader_loads_a_tiny_twin_and_an_adapter(tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from bvip_helpers.demo import twins

    monkeypatch.setenv("BVIP_ROOT", str(tmp_path))
    twins.build_tiny_model("qwen2-vl", tmp_path / "runs/models/tiny-qwen2-vl", seed=0)
    model, processor = load_model_and_processor("tiny-qwen2-vl", dtype="fp32")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and model.dtype == torch.float32
    assert hasattr(processor, "image_processor")

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=MODELS["tiny-qwen2-vl"].lora_target_modules))
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_model_and_processor("tiny-qwen2-vl", adapter=tmp_path / "adapter")
    assert type(reloaded).__name__ == "PeftModel"
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_model_and_processor("tiny-qwen2-vl", adapter=tmp_path / "adapter")


CONFIGS = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration"),
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "florence2": ("Florence2Config", "Florence2ForConditionalGeneration"),
    "deepseek-vl": ("DeepseekVLConfig", "DeepseekVLForConditionalGeneration"),
    "internvl": ("InternVLConfig", "InternVLForConditionalGeneration"),
    "janus": ("JanusConfig", "JanusForConditionalGeneration"),
    "blip": ("BlipConfig", "BlipForConditionalGeneration"),
    "blip2": ("Blip2Config", "Blip2ForConditionalGeneration"),
    "llava-onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
}


@pytest.mark.parametrize("family", registry.FAMILIES)
def test_lora_targets_and_frozen_modules_match_the_real_architecture(family):
    """Built on the meta device from the default (full-size) config: names are real, no memory is used."""
    import torch
    import transformers

    config_name, model_name = CONFIGS[family]
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)())
    spec = MODELS[registry.FAMILY_REFERENCE[family]]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targeted = [n for n in names if re.fullmatch(spec.lora_target_modules, n)]
    assert len(targeted) >= 4, f"{family}: LoRA regex matches {len(targeted)} linear layers"
    all_names = [n for n, _ in model.named_modules()]
    for prefix in spec.frozen_modules:
        assert prefix in all_names, f"{family}: frozen module {prefix!r} does not exist"
        assert not any(n.startswith(prefix + ".") for n in targeted), f"{family}: LoRA hits frozen {prefix}"
    # only the language model gets adapters: no vision/projector layer is targeted
    assert not any(re.search(r"vision|visual|vqmodel|projector|aligner|qformer", n) for n in targeted)


def test_docs_models_md_is_up_to_date():
    doc = repo_root() / "docs" / "models.md"
    assert doc.is_file(), "docs/models.md missing: run `bvip models --markdown --write docs/models.md`"
    assert doc.read_text(encoding="utf-8") == registry.registry_table(markdown=True), (
        "docs/models.md is stale: run `bvip models --markdown --write docs/models.md`")


def test_cli_prints_both_tables(capsys):
    from bvip_helpers.cli import main

    assert main(["models"]) == 0
    plain = capsys.readouterr().out
    assert plain.splitlines()[0].startswith("name") and "tiny-qwen2-vl" in plain and "|" not in plain
    assert main(["models", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# Model registry") and "| qwen2-vl-2b | Qwen/Qwen2-VL-2B-Instruct |" in md


@pytest.mark.parametrize("family", ["qwen2-vl", "smolvlm", "internvl"])
def test_image_budget_reaches_the_image_processor(family, tmp_path):
    """The real entries' image budgets are valid image processor settings (checked on the family's tiny twin)."""
    from bvip_helpers.demo import twins

    twin_dir = twins.build_tiny_model(family, tmp_path / family)
    budget = MODELS[registry.FAMILY_REFERENCE[family]].image_budget
    before = json.dumps(budget, sort_keys=True)
    image_processor = registry.load_processor(twin_dir, budget).image_processor
    assert json.dumps(budget, sort_keys=True) == before, "loading must not edit the registry's budget in place"
    if family == "qwen2-vl":  # min/max_pixels, as transformers 5 spells them
        assert budget == {"size": QWEN_SIZE}
        assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (
            QWEN_SIZE["shortest_edge"], QWEN_SIZE["longest_edge"])
    elif family == "smolvlm":
        assert image_processor.size.longest_edge == 768
    else:
        assert image_processor.crop_to_patches is False
    with pytest.raises(ValueError, match="not settings of the image processor"):
        registry.load_processor(twin_dir, {"no_such_setting": 1})


def test_qwen_budget_holds_without_future_warnings(tmp_path):
    """Same 256-640 token budget, no min/max_pixels FutureWarning per call, even when the checkpoint's own
    processor config still carries min_pixels/max_pixels (as the Qwen hub repos do)."""
    import shutil
    import warnings

    from PIL import Image

    from bvip_helpers.demo import twins

    twin_dir = twins.build_tiny_model("qwen2-vl", tmp_path / "twin")
    hub_like = shutil.copytree(twin_dir, tmp_path / "hub-like")
    config_file = hub_like / "processor_config.json"
    config = json.loads(config_file.read_text())
    for name in ("image_processor", "video_processor"):
        config[name].pop("size")
        config[name].update(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    config_file.write_text(json.dumps(config))
    budget = MODELS["qwen2-vl-2b"].image_budget
    image = Image.new("RGB", (320, 240))
    for folder in (twin_dir, hub_like):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            processor = registry.load_processor(folder, budget)
            batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"] * 2, images=[[image]] * 2,
                              return_tensors="pt", padding=True)
        assert not [w for w in caught if "min_pixels" in str(w.message)], folder.name
        tokens = int(batch["image_grid_thw"][0].prod()) // 4  # 2x2 patches merge into one token
        assert 256 <= tokens <= 640, (folder.name, tokens)
        assert processor.video_processor.size.shortest_edge == QWEN_SIZE["shortest_edge"]


def test_readme_links_the_model_table_instead_of_copying_it():
    """One model table, in docs/models.md (generated); the README summarises and links it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/models.md" in readme
    assert "| qwen2-vl-2b | Qwen/Qwen2-VL-2B-Instruct |" not in readme


# --- The device and dtype policy reaches from_pretrained --------------------------


def _capture_from_pretrained(monkeypatch, *, capability=None):
    """Simulate a CUDA GPU (or none) and record what from_pretrained would be asked, without loading."""
    import importlib.util

    import torch
    import transformers

    calls: list[dict] = []

    class FakeModel:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            calls.append(kwargs)
            return cls()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(transformers, "Qwen2VLForConditionalGeneration", FakeModel, raising=False)
    monkeypatch.setattr(registry, "load_processor", lambda *a, **k: "processor")
    return calls


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), "float16"), ((8, 0), "bfloat16")])
def test_qlora_computes_in_the_model_dtype_on_this_ranks_gpu(monkeypatch, capability, dtype):
    import torch

    calls = _capture_from_pretrained(monkeypatch, capability=capability)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of `accelerate launch --num_processes 2`
    load_model_and_processor("qwen2-vl-2b", load_in_4bit=True, device="auto", place=False)
    kwargs = calls[-1]
    assert kwargs["dtype"] == getattr(torch, dtype)  # never dtype="auto" (bf16 for Qwen) under fp16 compute
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == kwargs["dtype"]
    assert kwargs["device_map"] == {"": 1}  # not GPU 0 for every rank
    assert kwargs["use_safetensors"] and not kwargs["trust_remote_code"]


def test_inference_loads_onto_the_gpu_and_training_leaves_placement_to_the_trainer(monkeypatch):
    import torch

    calls = _capture_from_pretrained(monkeypatch, capability=(7, 5))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    load_model_and_processor("qwen2-vl-2b", device="auto")
    assert calls[-1]["device_map"] == {"": 0} and calls[-1]["dtype"] == torch.float16
    load_model_and_processor("qwen2-vl-2b", device="auto", place=False)  # LoRA/full: the Trainer places it
    assert "device_map" not in calls[-1] and calls[-1]["dtype"] == torch.float16
    load_model_and_processor("qwen2-vl-2b", device="cpu")
    assert "device_map" not in calls[-1] and calls[-1]["dtype"] == torch.float32
    with pytest.raises(ValueError, match="bf16 needs compute capability 8.0"):
        load_model_and_processor("qwen2-vl-2b", device="cuda", dtype="bf16")


def test_cpu_default_is_fp32_without_a_device_map(monkeypatch):
    import torch

    calls = _capture_from_pretrained(monkeypatch, capability=None)
    load_model_and_processor("qwen2-vl-2b")
    assert calls[-1]["dtype"] == torch.float32 and "device_map" not in calls[-1]


def test_four_bit_config_kwargs_need_a_real_dtype():
    import torch

    assert registry.four_bit_config_kwargs(torch.bfloat16)["bnb_4bit_compute_dtype"] is torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype must be the model's torch dtype"):
        registry.four_bit_config_kwargs("auto")


def test_every_real_model_has_a_recipe_per_gpu_size(monkeypatch):
    import torch

    for spec in HF_NATIVE:
        r16, r24, r80 = (spec.recipes[k] for k in ("16gb", "24gb", "80gb"))
        assert r16.dtype == "fp16", f"{spec.name}: a 16 GB T4 has no bf16"
        assert r24.dtype == r80.dtype == "bf16" and not r24.load_in_4bit and not r80.load_in_4bit
        assert all(r.gradient_checkpointing for r in (r16, r24, r80))
        effective = [r.per_device_batch_size * r.grad_accum for r in (r16, r24, r80)]
        assert min(effective) >= 16, f"{spec.name}: every recipe keeps an effective batch of 16 or more"
    assert registry.recipe_for("qwen2-vl-2b", "24gb") == ("24gb", MODELS["qwen2-vl-2b"].recipes["24gb"])
    assert registry.recipe_for("qwen2-vl-2b", "") == ("", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.recipe_for("qwen2-vl-2b", "auto") == ("", None)  # no GPU: no recipe
    with pytest.raises(ValueError, match="tiny-qwen2-vl has no 16gb recipe"):
        registry.recipe_for("tiny-qwen2-vl", "16gb")
