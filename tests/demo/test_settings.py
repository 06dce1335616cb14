"""The demo's settings reach the notebooks as papermill parameters, and the committed base is a real checkpoint."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from bvip_helpers.demo import settings
from bvip_helpers.demo.base import MODEL_FILES, RECORD_FILE, sha256
from bvip_helpers.io import repo_root

REPO = repo_root()


def _parameters(notebook: str) -> dict:
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / f"{notebook}.ipynb", as_version=4)
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(nb.cells[1].source).body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("notebook", ["00_zero_shot", "03_sft", "04_dpo", "05_eval", "06_error_gallery"])
def test_demo_parameters_are_parameters_of_the_notebook(notebook):
    demo, defaults = settings.notebook_params(notebook), _parameters(notebook)
    assert demo, "the demo passes this notebook its own settings"
    assert set(demo) <= set(defaults), f"not parameters of {notebook}: {sorted(set(demo) - set(defaults))}"
    for key, value in demo.items():
        assert type(value) is type(defaults[key]) or isinstance(defaults[key], float), key


def test_the_demo_trains_the_twin_with_its_own_settings():
    demo = settings.notebook_params("03_sft")
    assert demo["model"] == "tiny-qwen2-vl-base" and demo["lr"] == 4e-3 and demo["lora_r"] == 64
    assert demo["max_steps"] == 1000 and demo["lora_modules_to_save"] == "lm_head"
    assert demo["train_file"].endswith("bvpi_chat_train_copy_paste.jsonl")
    dpo = settings.notebook_params("04_dpo")
    assert dpo["sft_adapter"] == f"runs/{demo['model']}/sft" and dpo["model"] == demo["model"]
    assert settings.notebook_params("05_eval")["ADAPTERS"] == [f"runs/{demo['model']}/sft", f"runs/{demo['model']}/dpo"]


def test_the_gallery_reads_the_predictions_notebook_05_writes():
    from bvip_helpers import runs

    evaluation = settings.notebook_params("05_eval")
    variants = runs.eval_variants(evaluation["MODELS"], evaluation["ADAPTERS"], also_constrained=False)
    written = {f"runs/{runs.run_dir(v, 'runs').relative_to(REPO / 'runs').as_posix()}/preds_test.jsonl" for v in variants}
    assert set(settings.notebook_params("06_error_gallery")["PREDICTION_FILES"].values()) == written
    assert "notebook 06_error_gallery" in (REPO / "scripts" / "demo.sh").read_text()


def test_demo_params_cli_writes_yaml_papermill_reads(tmp_path):
    import yaml

    out = tmp_path / "params.yaml"
    result = subprocess.run([sys.executable, "-m", "bvip_helpers", "demo", "params", "03_sft", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text()) == settings.notebook_params("03_sft")


def test_demo_script_draws_the_scenes_the_demo_settings_were_tuned_on():
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert f"BVIP_DEMO_SCENES:-{settings.SCENES}}}" in script
    assert "bvip demo params" in script and "bvip demo copy-paste" in script


def test_committed_base_is_complete_and_matches_its_record():
    base = REPO / settings.base_dir()
    record = json.loads((base / RECORD_FILE).read_text())
    assert {p.name for p in base.iterdir()} == {*MODEL_FILES, RECORD_FILE}
    for name in MODEL_FILES:
        assert sha256(base / name) == record["sha256"][name], f"{name} differs from what base_record.json says"
    assert record["settings"]["scenes"] == settings.SCENES
    assert {k: record["settings"][k] for k in settings.BASE} == settings.BASE
    assert (base / "model.safetensors").stat().st_size < 8 * 1024**2


@pytest.mark.slow
def test_committed_base_writes_a_generic_caption_without_the_mandatory_fields():
    """Like a downloaded base model: it captions the scene, but knows nothing of the BVIP format."""
    pytest.importorskip("torch")
    from bvip_helpers import families, schema
    from bvip_helpers.io import load_image
    from bvip_helpers.sft import load_trained

    model, processor, spec = load_trained("tiny-qwen2-vl-base")
    images = [load_image(p) for p in sorted((REPO / "data" / "sample" / "testing" / "images").glob("*.jpg"))[:4]]
    texts = families.generate_captions(model, processor, spec, images, [schema.DEFAULT_PROMPT] * len(images),
                                       max_new_tokens=60)
    for text in texts:
        parsed = schema.parse_caption(text)
        assert len(text.split()) >= 8, text  # a sentence about the scene, not an empty answer
        assert "sidewalk" in text.lower(), text
        assert not any(parsed.fields.values()), f"the base already writes BVIP fields: {text!r}"
        assert "Nearby:" not in text


def test_the_demo_runs_notebook_00_after_05_on_the_committed_base():
    script = (REPO / "scripts" / "demo.sh").read_text()
    assert script.index("notebook 05_eval") < script.index("notebook 00_zero_shot") < script.index("notebook 06_error")
    zero_shot = settings.notebook_params("00_zero_shot")
    assert {entry["model"] for entry in zero_shot["BACKENDS"] + zero_shot["CHAIN"]} == {"tiny-qwen2-vl-base"}
    assert len(zero_shot["CHAIN"]) == 2 and zero_shot["PROMPTS"] == ["plain", "bvip"]
