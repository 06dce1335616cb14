"""SFT: pre-flight budget, one step per family, resume equivalence, merge equivalence, launchers, notebook."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from bvip_helpers import families, sft  # noqa: E402
from bvip_helpers.demo import twins  # noqa: E402
from bvip_helpers.io import ANNOTATIONS_FILE, CAPTIONS_FILE  # noqa: E402
from bvip_helpers.registry import get_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


_TWINS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def twin_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft_twins")


def twin(family: str, root: Path, data_dir: Path) -> Path:
    if family not in _TWINS:
        _TWINS[family] = twins.build_tiny_model(family, root / family, data_dir=data_dir, seed=0)
    return _TWINS[family]


def params(model: Path, data: Path, out: Path, **overrides) -> sft.SFTParams:
    base = dict(model=str(model), data_dir=str(data), image_root=str(SAMPLE), output_dir=str(out), batch_size=2,
                max_steps=2, lr=5e-3, logging_steps=1, eval=False, merge=False, seed=0, max_length=1024)
    base.update(overrides)
    return sft.SFTParams(**base)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_preflight_refuses_a_max_length_that_cuts_tokens(sample_data, twin_root, tmp_path):
    model = twin("qwen2-vl", twin_root, sample_data)
    p = params(model, sample_data, tmp_path / "run", max_length=64)
    with pytest.raises(sft.TokenBudgetError, match=r"max_length=64 is too small.*image.*response"):
        sft.train_sft(p)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    # the CLI turns it into a clear message and exit code 2
    result = subprocess.run([sys.executable, "-m", "bvip_helpers", "sft", "--model", str(model), "--data_dir",
                             str(sample_data), "--image_root", str(SAMPLE), "--output_dir", str(tmp_path / "cli"),
                             "--max_length", "64", "--eval", "false"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "too small" in result.stderr


def test_token_budget_reports_min_median_max(sample_data, twin_root):
    from bvip_helpers.registry import load_model_and_processor

    spec = get_spec(str(twin("qwen2-vl", twin_root, sample_data)))
    _, processor = load_model_and_processor(spec)
    records = sft.load_split(params("x", sample_data, Path("unused")), "train")
    budget = sft.token_budget(processor, spec, records, SAMPLE, max_length=2048, limit=8)
    assert budget["image_tokens"]["min"] > 0  # the twin keeps its own small image budget
    assert budget["image_tokens"]["max"] < 100
    for key in ("image_tokens", "prompt_tokens", "response_tokens", "total_tokens"):
        assert budget[key]["min"] <= budget[key]["median"] <= budget[key]["max"]
    assert "median" in sft.format_budget(budget)


def test_qlora_needs_cuda_with_a_clear_message(sample_data, twin_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    p = params(twin("qwen2-vl", twin_root, sample_data), sample_data, tmp_path, method="qlora")
    with pytest.raises(RuntimeError, match="CUDA"):
        sft.train_sft(p)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(twins.FAMILIES))
def test_one_sft_step_per_family(family, sample_data, twin_root, tmp_path):
    model = twin(family, twin_root, sample_data)
    result = sft.train_sft(params(model, sample_data, tmp_path / "run", max_steps=1, max_length=2048))
    spec = get_spec(str(model))
    assert result.trainer == spec.trainer
    assert result.global_step == 1
    assert result.losses and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    tensors = adapter_tensors(tmp_path / "run")
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items()), "LoRA B never moved"
    assert not any("visual" in k or "vision" in k for k in tensors), "the vision tower must stay frozen"
    assert (tmp_path / "run" / "loss_curve.png").is_file()


class _Killed(RuntimeError):
    pass


def _kill_after_save(step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise _Killed(f"simulated kill after the checkpoint of step {step}")

    return Kill()


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_adapter(sample_data, twin_root, tmp_path):
    model = twin("qwen2-vl", twin_root, sample_data)
    straight = params(model, sample_data, tmp_path / "straight", max_steps=6, save_steps=3, lora_dropout=0.1)
    sft.train_sft(straight)
    killed = params(model, sample_data, tmp_path / "killed", max_steps=6, save_steps=3, lora_dropout=0.1)
    with pytest.raises(_Killed):
        sft.train_sft(killed, callbacks=[_kill_after_save(3)])
    assert (tmp_path / "killed" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "killed" / "checkpoint-3" / "chat_template.jinja").is_file()  # processor beside it
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    killed.resume = "auto"
    result = sft.train_sft(killed)
    assert result.global_step == 6
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # and the check can fail: a different seed gives a different adapter
    other = params(model, sample_data, tmp_path / "other", max_steps=6, seed=1, lora_dropout=0.1)
    sft.train_sft(other)
    c = adapter_tensors(tmp_path / "other")
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_merged_model_generates_like_the_adapter_and_eval_is_written(sample_data, twin_root, tmp_path):
    model = twin("qwen2-vl", twin_root, sample_data)
    out = tmp_path / "run"
    result = sft.train_sft(params(model, sample_data, out, max_steps=8, lr=1e-2, merge=True, eval=True,
                                  eval_limit=4, max_new_tokens=24, captions_csv=str(SAMPLE / CAPTIONS_FILE),
                                  annotations_csv=str(SAMPLE / ANNOTATIONS_FILE)))
    assert result.merge_check["identical"], result.merge_check
    assert any(result.merge_check["adapter"]), "the adapter generated nothing; the comparison would be empty"
    merged = Path(result.merged_dir)
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    report = json.loads((out / "eval_val.json").read_text())
    assert report["split"] == "val" and set(report["presence"]) == {"sidewalk_pos", "road_pos", "road_vs_sidewalk"}
    assert len((out / "preds_val.jsonl").read_text().splitlines()) == 4
    # the merged folder is a model the registry can load again (family from config.json)
    assert get_spec(str(merged)).family == "qwen2-vl"


@pytest.mark.slow
def test_full_finetune_keeps_the_vision_tower_frozen_unless_asked(sample_data, twin_root, tmp_path):
    from bvip_helpers.registry import load_model_and_processor

    model = twin("qwen2-vl", twin_root, sample_data)
    sft.train_sft(params(model, sample_data, tmp_path / "full", method="full", max_steps=2))
    before, _ = load_model_and_processor(get_spec(str(model)))
    after, _ = load_model_and_processor(get_spec(str(tmp_path / "full")))
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert all(torch.equal(b[n], a[n]) for n in b if n.startswith("model.visual"))
    assert any(not torch.equal(b[n], a[n]) for n in b if "language_model" in n)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(sample_data, twin_root, tmp_path):
    """Two real DDP processes on the CPU (gloo). ``accelerate launch --cpu --num_processes 2`` would start ONE
    process (multi-CPU needs mpirun there); ``--multi_gpu`` starts two through torch.distributed.run, and
    ``--device cpu`` makes the Trainer join them over gloo, with or without a GPU."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not installed")
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    model = twin("qwen2-vl", twin_root, sample_data)
    out = tmp_path / "ddp"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "bvip_helpers", "sft", "--model", str(model), "--device", "cpu",
           "--data_dir", str(sample_data), "--image_root", str(SAMPLE), "--output_dir", str(out),
           "--max_steps", "2", "--batch_size", "1", "--eval", "false", "--merge", "false", "--logging_steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BVIP_ROOT": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "sft_result.json").read_text())
    assert state["global_step"] == 2 and state["processes"] == 2 and state["distributed"] == "MULTI_CPU"
    assert (out / "adapter_model.safetensors").is_file()


def test_accelerate_configs_are_shipped_and_valid():
    import yaml

    configs = REPO / "bvip_helpers" / "configs"
    for name in ("ddp", "fsdp", "zero2", "zero3"):
        config = yaml.safe_load((configs / f"accelerate_{name}.yaml").read_text())
        assert config["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
        if name.startswith("zero"):
            ds_file = REPO / config["deepspeed_config"]["deepspeed_config_file"]
            assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == int(name[-1])


@pytest.mark.slow
def test_notebook_03_smoke_runs_headless(tmp_path):
    papermill = pytest.importorskip("papermill")
    if not (SAMPLE / "complete_captions_sensation.csv").is_file():
        pytest.skip("data/sample not found")
    out = tmp_path / "03_sft.ipynb"
    runs = tmp_path / "runs"
    papermill.execute_notebook(str(REPO / "notebooks" / "03_sft.ipynb"), str(out), kernel_name="python3",
                               parameters={"SMOKE": True, "runs_dir": str(runs)},
                               cwd=str(REPO / "notebooks"), progress_bar=False)
    sft_dir = runs / "tiny-qwen2-vl-base" / "sft"  # smoke mode trains the committed demo base
    report = json.loads((sft_dir / "eval_val.json").read_text())
    assert report["split"] == "val" and report["n"] > 0
    assert (sft_dir / "adapter_model.safetensors").is_file() and (sft_dir / "loss_curve.png").is_file()
    assert json.loads((sft_dir / "sft_result.json").read_text())["merge_check"]["identical"]
    assert sorted(p.name for p in sft_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def _notebook_parameters(name: str) -> dict:
    import ast

    import nbformat

    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(nb.cells[1].source).body if isinstance(node, ast.Assign)}


def test_notebook_03_defaults_suit_a_real_checkpoint():
    """A learner who opens notebook 03 gets a real model's settings; the tiny twin's come only from the demo."""
    from bvip_helpers.registry import MODELS

    defaults = _notebook_parameters("03_sft")
    assert not MODELS[defaults["model"]].is_local and MODELS[defaults["model"]].family
    assert defaults["lr"] == sft.SFTParams.lr == 2e-4
    assert defaults["lora_r"] == 16 and defaults["lora_targets"] == "" and defaults["lora_modules_to_save"] == ""
    assert defaults["method"] == "lora" and not defaults["SMOKE"]


def test_collator_cache_stays_within_its_budget_and_batches_alike(sample_data, twin_root):
    from bvip_helpers.registry import get_spec, load_model_and_processor

    spec = get_spec(str(twin("qwen2-vl", twin_root, sample_data)))
    _, processor = load_model_and_processor(spec)
    records = sft.load_split(params("x", sample_data, Path("unused")), "train")[:4]
    cached = sft.FamilyCollator(processor, spec, SAMPLE, 2048)
    uncached = sft.FamilyCollator(processor, spec, SAMPLE, 2048, cache_bytes=0)
    first, again, plain = cached(records), cached(records), uncached(records)
    assert len(cached._encoded) == 4 and not uncached._encoded
    for key, value in plain.items():
        assert torch.equal(first[key], value) and torch.equal(again[key], value), key


@pytest.mark.parametrize(("family", "modules_to_save"), [("qwen2-vl", ""), ("smolvlm", ""), ("qwen2-vl", "lm_head")])
def test_plain_loss_matches_trls_fused_loss_and_logs_the_same_metrics(family, modules_to_save, sample_data, twin_root,
                                                                       tmp_path):
    """fused_lm_head=off (the CPU default) must train exactly like TRL's fused LM head: same loss, same gradients,
    the output layer included when it is trained beside the adapter (the demo's ``lora_modules_to_save``)."""
    model_dir = twin(family, twin_root, sample_data)
    spec = get_spec(str(model_dir))
    results = {}
    for choice in ("on", "off"):
        p = params(model_dir, sample_data, tmp_path / choice, fused_lm_head=choice,
                   lora_modules_to_save=modules_to_save)
        records = sft.load_split(p, "train")[:4]
        torch.manual_seed(0)
        model, processor = sft.prepare_model(p, spec)
        trainer = sft.build_trainer(p, spec, model, processor, records)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(records))
        loss.backward()
        grads = {n: w.grad.clone() for n, w in trainer.model.named_parameters() if w.grad is not None}
        results[choice] = loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}
    (fused_loss, fused_grads, fused_logs), (plain_loss, plain_grads, plain_logs) = results["on"], results["off"]
    assert plain_loss == pytest.approx(fused_loss, rel=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    assert any("lm_head" in name for name in plain_grads) == bool(modules_to_save)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(plain_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert plain_logs.keys() == fused_logs.keys() >= {"entropy", "mean_token_accuracy", "num_tokens"}
    for key, value in fused_logs.items():
        assert plain_logs[key] == pytest.approx(value, rel=1e-4), key


def test_fused_lm_head_setting_is_checked():
    with pytest.raises(ValueError, match="fused_lm_head"):
        sft.use_fused_lm_head(sft.SFTParams(fused_lm_head="maybe"))
    assert sft.use_fused_lm_head(sft.SFTParams(fused_lm_head="on"))
    assert not sft.use_fused_lm_head(sft.SFTParams(fused_lm_head="off"))
    assert sft.use_fused_lm_head(sft.SFTParams()) == torch.cuda.is_available()


def test_checkpoint_cut_short_is_recognised_without_loading_it(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"w": torch.zeros(64, 64)}, str(checkpoint / "adapter_model.safetensors"))
    torch.save({"state": torch.zeros(8)}, checkpoint / "optimizer.pt")
    assert sft.checkpoint_problem(checkpoint) is None
    weights = (checkpoint / "adapter_model.safetensors").read_bytes()
    (checkpoint / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])  # killed mid-save
    assert sft.checkpoint_problem(checkpoint) == "adapter_model.safetensors is cut short"
    (checkpoint / "adapter_model.safetensors").write_bytes(weights)
    optimizer = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(optimizer[:-100])
    assert sft.checkpoint_problem(checkpoint) == "optimizer.pt is cut short"
    (checkpoint / "trainer_state.json").unlink()
    assert "no trainer_state.json" in sft.checkpoint_problem(checkpoint)


def test_resume_deletes_the_earlier_end_results_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "merged").mkdir()
    for name in ("eval_val.json", "preds_val.jsonl", "sft_result.json", "adapter_model.safetensors"):
        (out / name).write_text("old")
    monkeypatch.setattr(sft, "checkpoint_problem", lambda folder: None)
    p = sft.SFTParams(model="x", output_dir=str(out), resume="auto")
    assert sft.prepare_output_dir(p) == str(out / "checkpoint-2")
    assert sorted(x.name for x in out.iterdir()) == ["adapter_model.safetensors", "checkpoint-2"]
    with pytest.raises(ValueError, match="only one of them"):
        sft.check_params(sft.SFTParams(resume="auto", overwrite=True))


# --- Real checkpoints on a GPU: recipes, device policy, memory, tiles (issue 17) --------------------


def _simulate_gpu(monkeypatch, capability=(8, 6), memory_gib=23.6):
    props = type("Props", (), {"total_memory": int(memory_gib * 1024**3)})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)


def test_a_recipe_sets_batch_accumulation_dtype_4bit_and_checkpointing(monkeypatch):
    _simulate_gpu(monkeypatch, capability=(8, 6), memory_gib=23.6)  # an L4 / A10 / RTX 3090
    spec = get_spec("qwen2-vl-2b")
    applied = sft.effective_params(sft.SFTParams(recipe="auto"), spec)
    assert (applied.recipe, applied.batch_size, applied.grad_accum, applied.dtype, applied.method,
            applied.gradient_checkpointing) == ("24gb", 4, 4, "bf16", "lora", True)
    _simulate_gpu(monkeypatch, capability=(7, 5), memory_gib=14.7)  # Colab's T4
    applied = sft.effective_params(sft.SFTParams(recipe="auto"), spec)
    assert (applied.recipe, applied.batch_size, applied.grad_accum, applied.dtype, applied.method,
            applied.gradient_checkpointing) == ("16gb", 1, 16, "fp16", "qlora", True)
    # settings the user chose win over the recipe: a batch of 2 (differs from the default), and LoRA on a
    # 16-bit base, which equals the default and so must be named (the CLI names every flag given)
    assert sft.effective_params(sft.SFTParams(recipe="16gb", batch_size=2), spec).batch_size == 2
    mine = sft.effective_params(sft.SFTParams(recipe="16gb", method="lora", explicit=("method",)), spec)
    assert (mine.batch_size, mine.grad_accum, mine.method) == (1, 16, "lora")
    # a bf16 recipe on a 24 GB card below compute capability 8.0 falls back to the policy's fp16
    _simulate_gpu(monkeypatch, capability=(7, 5), memory_gib=23.6)  # Quadro RTX 6000 / Titan RTX
    assert sft.effective_params(sft.SFTParams(recipe="24gb"), spec).dtype == "auto"
    assert sft.effective_params(sft.SFTParams(), spec) == sft.SFTParams()  # no recipe: nothing changes


def test_the_cli_records_the_flags_given_so_the_recipe_never_overrides_them(monkeypatch):
    _simulate_gpu(monkeypatch, capability=(8, 0), memory_gib=79.2)
    parser = argparse.ArgumentParser()
    sft.configure_cli(parser)
    args = parser.parse_args(["--model", "qwen2-vl-2b", "--recipe", "auto", "--batch_size", "4"])  # 4 = default
    params = sft.params_from_cli(args)
    assert set(params.explicit) == {"model", "recipe", "batch_size"}
    applied = sft.effective_params(params, get_spec("qwen2-vl-2b"))
    assert (applied.recipe, applied.batch_size, applied.grad_accum, applied.dtype) == ("80gb", 4, 2, "bf16")
    assert "--explicit" not in parser.format_help() and "flag you set yourself wins" in parser.format_help()


def test_recipe_without_a_gpu_and_on_a_twin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    twin_spec = get_spec("tiny-qwen2-vl")
    assert sft.effective_params(sft.SFTParams(recipe="auto"), twin_spec).recipe == ""  # CPU: nothing applied
    with pytest.raises(ValueError, match="has no 16gb recipe"):
        sft.effective_params(sft.SFTParams(recipe="16gb"), twin_spec)


def test_training_arguments_follow_the_device_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = get_spec("qwen2-vl-2b")
    applied = sft.effective_params(sft.SFTParams(recipe="16gb"), spec)  # a T4 recipe asked for on a CPU
    assert applied.dtype == "auto" and applied.method == "qlora"
    args = sft._training_args(applied, tmp_path, "collator_trainer")
    assert args.use_cpu and not args.bf16 and not args.fp16  # exactly what the CPU ran before
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 16)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    plain = sft._training_args(sft.SFTParams(), tmp_path, "collator_trainer")
    assert not plain.gradient_checkpointing and plain.gradient_checkpointing_kwargs is None
    assert sft.devices.mixed_precision_flags("fp16", "cuda") == {"bf16": False, "fp16": True}


def test_step_memory_estimate_follows_its_formula(sample_data, twin_root):
    model_dir = twin("qwen2-vl", twin_root, sample_data)
    spec = get_spec(str(model_dir))
    p = params(model_dir, sample_data, Path("unused"), batch_size=4)
    model, _ = sft.prepare_model(p, spec)
    budget = {"total_tokens": {"max": 100}}
    estimate = sft.estimate_step_memory(model, p, budget)
    config = model.config.get_text_config()
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    gib = 1024**3
    assert estimate["label"] == "estimate" and estimate["tokens_per_micro_batch"] == 400
    assert estimate["weights_gib"] == pytest.approx(sum(x.numel() * 4 for x in model.parameters()) / gib, abs=1e-3)
    assert estimate["trainable_state_gib"] == pytest.approx(trainable * 12 / gib, abs=1e-3)
    assert estimate["activations_gib"] == pytest.approx(400 * h * 34 * layers * 2 / gib, abs=1e-3)  # fp32, no GC
    assert estimate["logits_gib"] == pytest.approx(400 * vocab * 10 / gib, abs=1e-3)
    assert sft.estimate_step_memory(model, p, budget, fused_lm_head=True)["logits_gib"] == 0
    checkpointed = sft.estimate_step_memory(model, sft.replace(p, gradient_checkpointing=True), budget)
    assert checkpointed["activations_gib"] == pytest.approx(400 * h * (2 * layers + 34) * 2 / gib, abs=1e-3)
    line = sft.format_budget({"samples_checked": 1, "max_length": 1024, "step_memory": estimate,
                              **{k: {"min": 1, "median": 1, "max": 1} for k in
                                 ("image_tokens", "prompt_tokens", "response_tokens", "total_tokens")}})
    assert "expected memory per step (an estimate, not measured" in line


def test_frozen_base_keeps_its_16bit_dtype_and_what_trains_is_fp32(sample_data, twin_root):
    """bf16 on the CPU stands in for a GPU's 16-bit base: the vision tower stays 16-bit (no fp32 upcast)."""
    model_dir = twin("qwen2-vl", twin_root, sample_data)
    p = params(model_dir, sample_data, Path("unused"), device="cpu", dtype="bf16", lora_modules_to_save="lm_head")
    model, _ = sft.prepare_model(p, get_spec(str(model_dir)))
    trained = {n: w.dtype for n, w in model.named_parameters() if w.requires_grad}
    frozen = {n: w.dtype for n, w in model.named_parameters() if not w.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert any("lm_head" in n for n in trained)  # modules_to_save copies too (fp16 AMP refuses fp16 grads)
    assert {frozen[n] for n in frozen if "visual" in n} == {torch.bfloat16}
    assert not sft._is_4bit(model)


def test_4bit_preparation_freezes_without_upcasting(sample_data, twin_root):
    from bvip_helpers.registry import load_model_and_processor

    model, _ = load_model_and_processor(get_spec(str(twin("qwen2-vl", twin_root, sample_data))), dtype="bf16")
    sft._prepare_4bit_base(model, gradient_checkpointing=True)
    assert not any(w.requires_grad for w in model.parameters())
    assert {w.dtype for w in model.parameters()} == {torch.bfloat16}  # peft's helper would make these fp32


def _photos(root: Path) -> list[dict]:
    """Photos of three aspect ratios (SmolVLM splits them into different numbers of tiles)."""
    from PIL import Image

    records = []
    for i, size in enumerate([(480, 640), (300, 800), (640, 480)]):
        name = f"photo_{size[0]}x{size[1]}.jpg"
        Image.new("RGB", size, (40 * i + 60, 120, 160)).save(root / name)
        records.append({"image": name, "prompt": "Describe the scene.", "response": f"Sidewalk: left. {i}"})
    return records


def test_collator_batches_photos_whose_tile_counts_differ(sample_data, tmp_path_factory):
    """The cached path pads a varying tile count (it used to torch.cat them and fail); cache on == off."""
    from bvip_helpers.registry import load_model_and_processor

    root = tmp_path_factory.mktemp("smolvlm_split")
    model_dir = twins.build_tiny_model("smolvlm", root / "twin", data_dir=sample_data, seed=0, image_splitting=True)
    spec = get_spec(str(model_dir))
    model, processor = load_model_and_processor(spec)
    assert processor.image_processor.do_image_splitting
    images = root / "images"
    images.mkdir()
    records = _photos(images)
    encoded = [families.encode_example(processor, spec, families.load_record_image(images, r), r["prompt"],
                                       r["response"]) for r in records]
    tiles = [e.inputs["pixel_values"].shape[1] for e in encoded]
    assert len(set(tiles)) > 1, f"the photos should split into different tile counts, got {tiles}"
    cached = sft.FamilyCollator(processor, spec, images, 4096)
    uncached = sft.FamilyCollator(processor, spec, images, 4096, cache_bytes=0)
    first, again, plain = cached(records), cached(records), uncached(records)
    assert len(cached._encoded) == 3 and not uncached._encoded
    assert first.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(first[key], value) and torch.equal(again[key], value), key
    assert first["pixel_values"].shape[1] == max(tiles)
    with torch.no_grad():
        assert torch.isfinite(model(**first).loss)


def test_deepspeed_zero_configs_are_valid_deepspeed_configs(tmp_path):
    """ZeRO-2 and ZeRO-3 files, their "auto" values filled as the Trainer fills them, pass DeepSpeed's own
    config class (the optional `deepspeed` extra; skipped where it is not installed)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             use_cpu=True, report_to="none")
    model = type("Model", (), {"config": type("Config", (), {"hidden_size": 1536})()})()
    for stage in (2, 3):
        hf = HfTrainerDeepSpeedConfig(str(REPO / "bvip_helpers" / "configs" / f"ds_zero{stage}.json"))
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, num_training_steps=10)
        config = DeepSpeedConfig(hf.config)
        assert config.zero_optimization_stage == stage
        assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (2, 4)
