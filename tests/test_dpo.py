"""DPO: the batches score what SFT trained, the reference is the SFT adapter, the reports and resume hold."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from safetensors.torch import load_file  # noqa: E402

from bvip_helpers import dpo, families, pairs, sft  # noqa: E402
from bvip_helpers.io import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
BASE = "tiny-qwen2-vl-base"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, sample_data):
    """A short SFT run on the committed base, the output layer trained in full beside LoRA (as in the demo)."""
    root, data = tmp_path_factory.mktemp("dpo"), sample_data
    adapter = root / "sft"
    sft.train_sft(sft.SFTParams(model=BASE, data_dir=str(data), image_root=str(SAMPLE), output_dir=str(adapter),
                                max_steps=3, batch_size=4, lr=4e-3, lora_r=8, lora_alpha=8, eval=False, merge=False,
                                lora_modules_to_save="lm_head", logging_steps=1))
    made, _ = pairs.controlled_pairs(read_jsonl(data / "bvpi_chat_train.jsonl"), seed=0)
    pairs.write_pairs(root / "pairs.jsonl", made)
    return root, adapter, made


def _params(root: Path, adapter: Path, out: str, **overrides) -> dpo.DPOParams:
    values = dict(model=BASE, adapter=str(adapter), train_pairs=str(root / "pairs.jsonl"), image_root=str(SAMPLE),
                  output_dir=str(root / out), max_steps=3, batch_size=2, lr=5e-3, beta=0.1, logging_steps=1, seed=0,
                  warmup=0.0)
    values.update(overrides)
    return dpo.DPOParams(**values)


def test_preference_batches_are_the_sft_rows_of_chosen_then_rejected(sft_run):
    from bvip_helpers.registry import get_spec, load_model_and_processor

    _, _, made = sft_run
    spec = get_spec(BASE)
    _, processor = load_model_and_processor(spec)
    batch = dpo.PreferenceCollator(processor, spec, SAMPLE, 1024)(made[:2])
    assert batch["input_ids"].shape[0] == 4 and "labels" not in batch
    plain = families.collate_train(processor, spec, [{"image": p["image"], "prompt": p["prompt"], "response": p[side]}
                                                     for side in ("chosen", "rejected") for p in made[:2]], SAMPLE)
    assert torch.equal(batch["completion_mask"].bool(), plain["labels"] != families.IGNORE_INDEX)
    tok = processor.tokenizer
    first = batch["input_ids"][0][batch["completion_mask"][0].bool()]
    assert tok.decode(first) == made[0]["chosen"] + families.end_token(processor)
    third = batch["input_ids"][2][batch["completion_mask"][2].bool()]
    assert tok.decode(third) == made[0]["rejected"] + families.end_token(processor)


@pytest.mark.slow
def test_dpo_starts_at_the_sft_model_and_trains_the_adapter_and_output_layer(sft_run):
    root, adapter, made = sft_run
    pairs.write_pairs(root / "val.jsonl", made[:4])
    result = dpo.train_dpo(_params(root, adapter, "dpo", val_pairs=str(root / "val.jsonl")))
    assert result.global_step == 3
    assert result.losses[0][1] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    out = Path(result.output_dir)
    assert not (out / "ref").exists() and (out / "adapter_model.safetensors").is_file()
    before, after = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any("lm_head" in k and not torch.equal(before[k], after[k]) for k in before), "lm_head was not trained"
    assert any("lora_B" in k and not torch.equal(before[k], after[k]) for k in before)
    saved = json.loads((out / "dpo_result.json").read_text())
    assert saved["global_step"] == 3 and (out / "loss_curve.png").is_file()
    # --val_pairs: the reference scored there is the SFT model, the policy the saved DPO adapter
    held_out = json.loads((out / "preference_report.json").read_text())
    for name, folder in (("sft", adapter), ("dpo", out)):
        model, processor, spec = sft.load_trained(BASE, adapter=folder)
        expected = dpo.preference_report(made[:4], dpo.score_pairs(model, processor, spec, made[:4], SAMPLE))
        assert held_out["held_out"][name]["all"]["logp_margin_mean"] == pytest.approx(
            expected["all"]["logp_margin_mean"], abs=2e-3)
    assert set(held_out["image_reliance"]["all"]) >= {"pairs", *dpo.IMAGE_VARIANTS}


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapter(sft_run):
    root, adapter, _ = sft_run
    args = dpo.build_dpo_trainer(_params(root, adapter, "checkpointing_args", gradient_checkpointing=True)).trainer.args
    assert getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    runs = [dpo.train_dpo(_params(root, adapter, f"checkpointing_{on}", max_steps=2, gradient_checkpointing=on))
            for on in (False, True)]
    a, b = (load_file(str(Path(r.output_dir) / "adapter_model.safetensors")) for r in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    assert [v for _, v in runs[0].losses] == pytest.approx([v for _, v in runs[1].losses], rel=1e-4)


@pytest.mark.slow
def test_trl_log_probabilities_match_our_scoring_of_the_sft_model(sft_run):
    """TRL's fused LM head must score with the output layer SFT trained (modules_to_save), and the reference
    must be the SFT adapter: at the start both give our own log-probabilities of the SFT model."""
    root, adapter, made = sft_run
    run = dpo.build_dpo_trainer(_params(root, adapter, "dpo_logps"))
    trainer = run.trainer
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, run.trainer.data_collator(made[:4]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    model, processor, spec = sft.load_trained(BASE, adapter=adapter)
    scores = dpo.score_pairs(model, processor, spec, made[:4], SAMPLE)
    logged = trainer._metrics["train"]
    assert logged["logps/chosen"][-1] == pytest.approx(sum(c for c, _ in scores) / 4, rel=1e-4)
    assert logged["logps/rejected"][-1] == pytest.approx(sum(r for _, r in scores) / 4, rel=1e-4)
    base, base_processor, base_spec = sft.load_trained(BASE)  # the base's own lm_head scores differently
    plain = dpo.score_pairs(base, base_processor, base_spec, made[:4], SAMPLE)
    assert sum(c for c, _ in plain) / 4 != pytest.approx(logged["logps/chosen"][-1], rel=1e-3)


@pytest.mark.slow
def test_a_resumed_dpo_run_ends_with_the_adapter_of_an_uninterrupted_one(sft_run):
    root, adapter, _ = sft_run
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # a run that dies after its checkpoint at step 2
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2
            return control

    whole = dpo.train_dpo(_params(root, adapter, "whole", max_steps=4, save_steps=2))
    parts = _params(root, adapter, "parts", max_steps=4, save_steps=2)
    cut = dpo.train_dpo(parts, callbacks=[StopAt()])
    assert cut.global_step == 2 and (Path(cut.output_dir) / "checkpoint-2").is_dir()
    resumed = dpo.train_dpo(dpo.DPOParams(**{**parts.__dict__, "resume": "auto"}))
    assert resumed.global_step == 4
    a = load_file(str(Path(whole.output_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.output_dir) / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_image_reliance_and_preference_reports_count_what_they_say():
    def caption(sidewalk: str, near: str) -> str:
        return f"Sidewalk: {sidewalk}. Road: front. RoadVsSidewalk: crossing_front. Nearby: {near}. Context: a street."

    pairs_ = [{"source": "controlled", "error_type": "sidewalk_flipped",
               "chosen": caption("left", "nothing close"), "rejected": caption("right", "nothing close")},
              {"source": "controlled", "error_type": "hazard_invented",
               "chosen": caption("left", "nothing close"), "rejected": caption("left", "a car close on the left")},
              {"source": "controlled", "error_type": "sidewalk_flipped",  # the mirror keeps a centred sidewalk
               "chosen": caption("center", "nothing close"), "rejected": caption("left", "nothing close")}]
    assert [dpo.mirror_makes_rejected_true(p) for p in pairs_] == [True, False, False]
    original = [(-1.0, -3.0), (-2.0, -1.0), (-1.0, -3.0)]
    mirror = [(-4.0, -2.0), (-2.0, -1.0), (-1.0, -3.0)]
    report = dpo.preference_report(pairs_, original, reference=[(-1.0, -1.0), (-2.0, -1.0), (-1.0, -1.0)], beta=0.5)
    assert report["all"]["preference_accuracy"] == pytest.approx(0.667, abs=1e-3)
    assert report["controlled:sidewalk_flipped"]["reward_margin_mean"] == 1.0
    reliance = dpo.image_reliance(pairs_, {"original": original, "mirror": mirror})
    assert reliance["sidewalk_flipped"]["mirror_turnable"] == 1  # the centred one cannot turn
    assert reliance["sidewalk_flipped"]["turned_by_mirror"] == 1.0
    assert "turned_by_mirror" not in reliance["hazard_invented"]
    from PIL import Image

    image = Image.new("RGB", (4, 2))
    image.putpixel((0, 0), (255, 0, 0))
    assert dpo.vary_image(image, "mirror").getpixel((3, 0)) == (255, 0, 0)
    assert dpo.vary_image(image, "blank").getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="image variant"):
        dpo.vary_image(image, "upside-down")


def test_dpo_cli_refuses_a_missing_adapter_and_a_bad_pairs_file(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"image": "a.jpg", "prompt": "p", "chosen": "c"}\n')
    for extra, message in ((["--adapter", str(tmp_path / "none"), "--train_pairs", str(bad)], "line 1 is not a"),
                           (["--adapter", str(tmp_path / "none"), "--train_pairs", str(tmp_path / "x.jsonl")],
                            "x.jsonl")):
        result = subprocess.run([sys.executable, "-m", "bvip_helpers", "dpo", "--model", BASE, *extra,
                                 "--output_dir", str(tmp_path / "out")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_notebook_04_smoke_runs_alone(tmp_path, monkeypatch):
    """Without notebook 03's smoke adapter (a fresh root), the smoke run trains a 2-step stand-in and goes on."""
    papermill = pytest.importorskip("papermill")
    root = tmp_path / "root"
    root.mkdir()
    for name in ("data", "models"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    for name, value in {"BVIP_SMOKE": "1", "BVIP_ROOT": str(root), "BVIP_FIGURES_DIR": str(tmp_path / "figures")}.items():
        monkeypatch.setenv(name, value)
    notebook = REPO / "notebooks" / "04_dpo.ipynb"
    papermill.execute_notebook(str(notebook), str(tmp_path / "04.ipynb"), cwd=str(notebook.parent),
                               kernel_name="python3", progress_bar=False)
    out = root / "runs" / "smoke" / "tiny-qwen2-vl-base"
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "dpo" / "preference_report.json").read_text())
    assert report["held_out"]["dpo"]["all"]["pairs"] > 0 and "seed" in report["held_out"]["dpo"]
    assert (out / "dpo" / "before_after_test.json").is_file()
