"""Batched, resumable caption generation: ``bvip predict``.

::

    bvip predict --model tiny-qwen2-vl --adapter runs/tiny-qwen2-vl/sft \\
        --jsonl data/bvpi_out/bvpi_sft_test.jsonl --image_root data/synthetic \\
        --out runs/tiny-qwen2-vl/preds_test.jsonl --batch_size 16 [--constrained]

Each finished batch is appended (fsync'd) to ``--out`` as one JSON line per image with
``image``, ``text``, ``model``, ``adapter``, the generation parameters and ``run_id``, which
``bvip evaluate`` reads directly. A rerun skips images already in the file, so a killed
run resumes where it stopped; a truncated last line (killed mid-write) is dropped, the
file rewritten atomically and the drop reported.

Only lines of the same run count as done. ``run_id`` is a short hash of everything that changes
the text: the model and adapter (and the size and time of their weight, config and template files),
the generation settings, the record's prompt and the image's content. A file holding any other line
(written by another tool, another model, other settings, or before a prompt or an image changed) is
refused, or moved aside to ``<out>.previous`` with ``restart_if_changed``. While a run writes
``--out`` it holds ``<out>.lock`` (an advisory lock naming its process): a second writer is refused.

Batches are sorted by prompt length and left-padded (the family code in
:mod:`bvip_helpers.families` builds them), decoding is greedy or beam search, and
``--constrained`` (see :mod:`bvip_helpers.constrained`) guarantees the three mandatory fields.

``--backend openai|ollama|clip-interrogator|chain`` captions through another backend of
:mod:`bvip_helpers.backends` (a served model, CLIP-Interrogator's method, a chain of experts) into the
same resumable file; its settings join each line under ``backend``. A line is written only once its
caption has arrived; an image whose request failed for good is reported and left for the next run::

    bvip predict --backend openai --model Qwen/Qwen2-VL-2B-Instruct --base_url http://127.0.0.1:8000/v1 \\
        --jsonl data/bvpi_out/bvpi_sft_test.jsonl --image_root data/synthetic --out runs/vllm/preds_test.jsonl \\
        --concurrency 8 [--structured vllm-regex]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bvip_helpers import schema
from bvip_helpers.backends import BACKENDS, BackendError, as_backend
from bvip_helpers.constrained import constrained_generate_kwargs, relation_consistency, repair_relation
from bvip_helpers.families import record_image_path, record_prompt
from bvip_helpers.io import (
    MAX_IMAGE_PIXELS,
    ImagePathError,
    JsonlError,
    OutputLockedError,
    append_jsonl,
    check_image_root,
    concerns,
    file_sha1,
    load_image,
    os_error_line,
    output_lock,
    parse_json_object,
    safe_image_path,
    write_jsonl,
)

#: the run's settings, written into every output line; with the prompt and the image they make its run_id.
RUN_KEYS = ("model", "adapter", "weights", "max_new_tokens", "num_beams", "do_sample", "constrained",
            "repair_relation")


@dataclass
class LoadedModel:
    """A model ready to generate: the weights, its processor, the registry spec and names for the output."""

    model: Any
    processor: Any
    spec: Any
    name: str
    adapter: str | None = None


@dataclass
class PredictStats:
    """What one :func:`predict` call did."""

    out_path: str
    total: int = 0  # distinct images asked for
    already_done: int = 0  # found in the output file and skipped
    generated: int = 0
    bad_images: list[str] = field(default_factory=list)  # reasons, one per skipped image
    duplicate_records: int = 0
    dropped_partial_lines: int = 0
    repaired: int = 0
    failed: list[str] = field(default_factory=list)  # images whose caption never arrived, with the reason
    schema_failures: int = 0  # served captions that do not fit the schema (marked schema_ok: false)
    relation: dict[str, Any] = field(default_factory=dict)  # contradictions among this run's captions
    seconds: float = 0.0

    @property
    def captions_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.generated} generated", f"{self.already_done} already done", f"total {self.total}"]
        if self.bad_images:
            parts.append(f"{len(self.bad_images)} bad images skipped")
        if self.duplicate_records:
            parts.append(f"{self.duplicate_records} duplicate records ignored")
        if self.dropped_partial_lines:
            parts.append(f"{self.dropped_partial_lines} truncated line dropped")
        if self.relation:
            parts.append(f"relation contradictions {self.relation['contradictions']}/{self.relation['checked']}")
        if self.repaired:
            parts.append(f"{self.repaired} relations repaired")
        if self.failed:
            parts.append(f"{len(self.failed)} failed (rerun to retry them)")
        if self.schema_failures:
            parts.append(f"{self.schema_failures} off the schema")
        return (f"predict: {', '.join(parts)} in {self.seconds:.1f}s "
                f"({self.captions_per_second:.2f} captions/s) -> {self.out_path}")


def load(model: Any, adapter: str | os.PathLike[str] | None = None, *, device: str = "auto", dtype: str = "auto",
         **kwargs: Any) -> LoadedModel:
    """Resolve ``model`` (registry name, hub id, local dir or registry spec) and load it, plus a PEFT ``adapter``.

    ``device`` / ``dtype`` follow :mod:`bvip_helpers.devices`: by default the model runs on the GPU when
    there is one (bf16 from compute capability 8.0, fp16 below), else on MPS or the CPU (fp32).
    """
    from bvip_helpers.registry import get_spec, load_model_and_processor

    spec = get_spec(str(model) if isinstance(model, (str, os.PathLike)) else model)
    loaded_model, processor = load_model_and_processor(spec, adapter=str(adapter) if adapter else None,
                                                       device=device, dtype=dtype, **kwargs)
    loaded_model.eval()
    return LoadedModel(loaded_model, processor, spec, name=str(getattr(spec, "name", model)),
                       adapter=str(adapter) if adapter else None)


def release(loaded: LoadedModel) -> None:
    """Free a loaded model now (host memory, and the GPU's cached blocks), not whenever the collector runs.

    Scoring several checkpoints one after another keeps one in memory at a time this way.
    """
    import gc

    loaded.model = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def prompt_of(record: Mapping[str, Any]) -> str:
    """The record's instruction (SFT ``prompt`` or chat user text), else the schema's default prompt."""
    return record_prompt(dict(record)) or schema.DEFAULT_PROMPT


# --- Resuming ---------------------------------------------------------------------


def recover_output(out_path: Path) -> tuple[list[dict[str, Any]], int, bool]:
    """Read an existing output file, leaving it untouched; a truncated LAST line is left out.

    Returns ``(records, dropped, rewrite)``: ``rewrite`` says the file must be rewritten from ``records``
    before lines are appended (its end was torn), which the caller does only once it knows the file
    is this run's. A malformed or non-UTF-8 line anywhere else is not a kill artefact and raises
    :class:`JsonlError` naming the line.
    """
    if not out_path.exists():
        return [], 0, False
    lines = out_path.read_bytes().split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b'' when the file ends with a newline
    records: list[dict[str, Any]] = []
    dropped = 0
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = parse_json_object(raw.decode("utf-8"))
        except ValueError as err:  # UnicodeDecodeError too: a kill can cut a character in half
            if number == len(complete) and not tail.strip():
                dropped += 1  # the last line is broken though newline-terminated: still the kill's
                continue
            raise JsonlError(f"{out_path}: line {number} is not a UTF-8 JSON object ({err}); this is not a truncated "
                             "last line from an interrupted run. Fix or delete that line, or use another --out.") from err
        records.append(record)
    if tail.strip():
        try:
            records.append(parse_json_object(tail.decode("utf-8")))  # a complete record that only lacks its newline
        except ValueError:
            dropped += 1
    return records, dropped, bool(dropped or tail.strip())


def free_name(path: Path) -> Path:
    """``path`` if nothing is there, else the first of ``path.1``, ``path.2``, ... that is free."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


#: files of a model or adapter folder that change what it writes: weights, configs (generation config
#: included), tokenizer and chat template. Reports written into the folder later (sft_result.json) are not.
_MODEL_FILE_PATTERNS = ("*.safetensors", "*config.json", "tokenizer*.json", "*.jinja", "*.model", "vocab.*",
                        "merges.txt", "special_tokens_map.json")


def weights_id(loaded: LoadedModel) -> str | None:
    """Size and mtime of the local model files (adapter and base), so retrained weights never resume old captions.

    ``None`` for hub checkpoints (their revision is fixed by the hub cache).
    """
    from bvip_helpers.io import resolve

    folders = [resolve(loaded.adapter)] if loaded.adapter else []
    source = Path(str(getattr(loaded.spec, "hub_id", "") or ""))
    if str(source) and resolve(source).is_dir():
        folders.append(resolve(source))
    files = sorted({f for folder in folders for pattern in _MODEL_FILE_PATTERNS for f in folder.glob(pattern)})
    stamps = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file()]
    return "|".join(stamps) or None


def run_id(settings: Mapping[str, Any], prompt: str, image_sha1: str | None) -> str:
    """The short hash a line carries: this run's settings, the record's prompt and the image's content."""
    payload = json.dumps({**settings, "prompt": prompt, "image_sha1": image_sha1}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def resumable_lines(existing: list[dict[str, Any]], settings: Mapping[str, Any],
                    expected: Mapping[str, str]) -> tuple[set[str], str | None]:
    """``(images done, None)``, or ``(set(), why)`` when a line of the file is not this run's.

    ``expected`` maps each image of this run to its :func:`run_id`. A line of this run for an image
    this call does not caption (another subset, ``--limit``) is kept, but not counted.
    """
    done: set[str] = set()
    written = json.loads(json.dumps(settings, default=str))  # as a line holds them (tuples become lists)
    for number, line in enumerate(existing, start=1):
        image = line.get("image")
        if not isinstance(image, str) or "run_id" not in line or any(k not in line for k in RUN_KEYS):
            return set(), (f"line {number} was not written by `bvip predict` (it lacks 'run_id' or the run's settings); "
                           "it may be the records file itself, another tool's output, or an older version's")
        # RUN_KEYS, then what the backend adds (its settings; the local path's device and dtype)
        different = {k: (line.get(k), v) for k, v in written.items() if k != "server" and line.get(k) != v}
        if "backend" in line and "backend" not in settings:  # a served run's file, resumed on the local path
            different["backend"] = (line["backend"], None)
        if different:
            return set(), "other settings (" + ", ".join(f"{k}: file has {a!r}, this run {b!r}"
                                                         for k, (a, b) in different.items()) + ")"
        if image in expected and line["run_id"] != expected[image]:
            return set(), (f"line {number} ({image}) was captioned from another prompt or another version of the "
                           "image: the record's prompt or the image file changed since")
        if image in expected:
            done.add(image)
    return done, None


# --- Generation --------------------------------------------------------------------


def _generate_batch(loaded: LoadedModel, images: list[Any], prompts: list[str], *, max_new_tokens: int,
                    num_beams: int, trie: Any) -> list[str]:
    from bvip_helpers.families import generate_captions

    kwargs: dict[str, Any] = {"num_beams": num_beams}
    if num_beams > 1:
        kwargs["early_stopping"] = True
    if trie is not None:
        kwargs.update(constrained_generate_kwargs(loaded.processor, trie))  # a fresh processor per batch
    return generate_captions(loaded.model, loaded.processor, loaded.spec, images, prompts,
                             max_new_tokens=max_new_tokens, **kwargs)


def predict(model_or_spec: Any, records: Iterable[Mapping[str, Any]], image_root: str | os.PathLike[str],
            out_path: str | os.PathLike[str], *, adapter: str | None = None, batch_size: int = 8,
            max_new_tokens: int = 128, num_beams: int = 1, constrained: bool = False,
            repair_relation_field: bool = False, limit: int | None = None, skip_bad_images: bool = False,
            restart_if_changed: bool = False, progress: bool = True,
            max_image_pixels: int = MAX_IMAGE_PIXELS, device: str = "auto", dtype: str = "auto") -> PredictStats:
    """Generate captions for ``records`` (dicts with ``image`` and optionally ``prompt``) into ``out_path``.

    ``model_or_spec``: a :class:`LoadedModel`, a backend of :mod:`bvip_helpers.backends`, or anything
    :func:`load` accepts (registry name, spec, hub id, local dir), loaded with ``adapter`` on ``device`` in
    ``dtype`` (see :mod:`bvip_helpers.devices`) once ``out_path`` is locked. Resumes an existing ``out_path``
    whose lines all belong to this run (see the module docstring); another file is refused, or
    moved to ``<out>.previous`` and started over with ``restart_if_changed``. A second process
    writing the same file gets :class:`~bvip_helpers.io.OutputLockedError`. A missing, corrupt or
    too large image (more than ``max_image_pixels``) raises :class:`ImagePathError` naming it,
    unless ``skip_bad_images`` (then it is counted in ``stats.bad_images``).
    """
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, num_beams and max_new_tokens must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: caption at least 1 image (leave --limit out to caption them all)")
    image_root = check_image_root(image_root)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out_path):  # before loading the model: a second writer or an unwritable folder fails at once
        backend = as_backend(model_or_spec, adapter, num_beams=num_beams, constrained=constrained, device=device,
                             dtype=dtype)
        return _predict_locked(backend, records, image_root, out_path, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams, constrained=constrained,
                               repair_relation_field=repair_relation_field, limit=limit,
                               skip_bad_images=skip_bad_images, restart_if_changed=restart_if_changed,
                               progress=progress, max_image_pixels=max_image_pixels)


def _predict_locked(backend: Any, records: Iterable[Mapping[str, Any]], image_root: Path, out_path: Path, *,
                    batch_size: int, max_new_tokens: int, num_beams: int, constrained: bool,
                    repair_relation_field: bool, limit: int | None, skip_bad_images: bool,
                    restart_if_changed: bool, progress: bool, max_image_pixels: int) -> PredictStats:
    """:func:`predict` once ``out_path`` is locked."""
    from tqdm.auto import tqdm

    stats = PredictStats(out_path=str(out_path))
    start = time.perf_counter()
    settings = {"model": backend.model_name, "adapter": backend.adapter, "weights": backend.weights_id(),
                "max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": backend.do_sample,
                "constrained": constrained, "repair_relation": repair_relation_field, **backend.run_settings()}
    identity = {k: v for k, v in settings.items() if k != "server"}  # a restarted server elsewhere resumes the file

    unique: dict[str, Mapping[str, Any]] = {}
    for number, record in enumerate(records, start=1):
        if not (record.get("image") or record.get("images")):
            raise ValueError(f"record {number} has no 'image' (or 'images') key")
        key = record_image_path(dict(record))
        if key in unique:
            stats.duplicate_records += 1
            continue
        if limit is not None and len(unique) >= limit:
            break
        unique[key] = record
    stats.total = len(unique)
    paths = {key: safe_image_path(image_root, key) for key in unique}  # an escaping path stops the run here
    expected = {key: run_id(identity, prompt_of(record), file_sha1(paths[key])) for key, record in unique.items()}

    existing, dropped, rewrite = recover_output(out_path)
    done, different = resumable_lines(existing, settings, expected)
    if different:  # the file is left byte for byte as it was: refused, or moved aside whole
        previous = free_name(out_path.with_name(out_path.name + ".previous"))
        if not restart_if_changed:
            raise ValueError(f"{out_path} holds predictions this run cannot resume: {different}. Use another --out, "
                             f"delete the file, or pass --restart_if_changed to move it to {previous} and start over")
        os.replace(out_path, previous)
        print(f"predict: {out_path} holds predictions this run cannot resume ({different}); moved it to "
              f"{previous} and starting over", file=sys.stderr)
        done = set()
    elif rewrite:
        write_jsonl(out_path, existing)
        stats.dropped_partial_lines = dropped
        if dropped:
            print(f"predict: dropped {dropped} truncated line(s) at the end of {out_path} "
                  "(an interrupted run) and rewrote it before resuming", file=sys.stderr)
    pending = [(key, r) for key, r in unique.items() if key not in done]
    stats.already_done = stats.total - len(pending)

    # Check every pending image first: a bad file should stop the run before any compute is spent.
    usable: list[tuple[str, Mapping[str, Any], Path]] = []
    for key, record in pending:
        try:
            load_image(paths[key], max_image_pixels)
        except ImagePathError as err:
            if not skip_bad_images:
                raise ImagePathError(f"{err}. Fix the image or --image_root, or pass --skip_bad_images "
                                     "to skip and count bad images") from err
            stats.bad_images.append(str(err))
            continue
        usable.append((key, record, paths[key]))
    if stats.bad_images:
        print(f"predict: skipped {len(stats.bad_images)} bad image(s): " + "; ".join(stats.bad_images[:5])
              + (" ..." if len(stats.bad_images) > 5 else ""), file=sys.stderr)

    # Similar prompt lengths in one batch mean less padding.
    usable.sort(key=lambda item: (len(prompt_of(item[1])), str(item[2])))
    texts: list[str] = []
    bar = tqdm(total=len(usable), desc=f"predict {backend.model_name}", unit="img", disable=not progress)
    step = max(batch_size, backend.concurrency)  # a served backend gets enough images to keep its requests busy
    for begin in range(0, len(usable), step):
        batch = usable[begin: begin + step]
        images = [load_image(path, max_image_pixels) for _, _, path in batch]
        prompts = [prompt_of(record) for _, record, _ in batch]
        generated = backend.caption(images, prompts, max_new_tokens=max_new_tokens)
        lines = []
        for (key, _, _), result in zip(batch, generated, strict=True):
            if not result.ok:  # nothing arrived: reported, and left for the next run to retry
                stats.failed.append(f"{key}: {result.error}")
                continue
            text = result.text
            stats.schema_failures += result.extra.get("schema_ok") is False
            line = {"image": key, "text": text, **settings, **result.extra, "run_id": expected[key]}
            if repair_relation_field:
                fixed, changed = repair_relation(text)
                line.update(text=fixed, text_raw=text, repaired=changed)
                stats.repaired += changed
            texts.append(text)
            lines.append(line)
        if lines:
            append_jsonl(out_path, lines)
        stats.generated += len(lines)
        bar.update(len(batch))
    bar.close()
    if stats.failed:
        print(f"predict: {len(stats.failed)} image(s) got no caption (rerun to retry them): "
              + "; ".join(stats.failed[:5]) + (" ..." if len(stats.failed) > 5 else ""), file=sys.stderr)
    stats.relation = relation_consistency(texts)  # of the raw model output, before any repair
    stats.seconds = time.perf_counter() - start
    return stats


# --- CLI -----------------------------------------------------------------------------


def configure_cli(parser: argparse.ArgumentParser) -> None:
    from bvip_helpers.io import resolve_cli_path

    parser.add_argument("--model", default=None, help="registry name, hub id or local model folder; for a served "
                        "backend, the name the server knows the model by (openai: default $OPENAI_MODEL)")
    parser.add_argument("--adapter", type=resolve_cli_path, default=None, help="PEFT adapter folder loaded on top of --model")
    parser.add_argument("--jsonl", type=resolve_cli_path, required=True, help="records with 'image' (and 'prompt'), e.g. bvpi_sft_test.jsonl")
    parser.add_argument("--image_root", type=resolve_cli_path, required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--out", type=resolve_cli_path, required=True,
                        help="predictions JSONL, appended to: a rerun resumes the lines of the same run (same model, "
                             "weights, settings, prompts and images; other lines are refused, see "
                             "--restart_if_changed). While it runs, <out>.lock names the process writing it, and a "
                             "second bvip predict on the same --out is refused")
    parser.add_argument("--batch_size", type=int, default=8, help="images per generation batch (default: 8)")
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="longest caption in tokens (default: 128)")
    parser.add_argument("--num_beams", type=int, default=1, help="1 = greedy")
    parser.add_argument("--constrained", action="store_true",
                        help="force 'Sidewalk: .. Road: .. RoadVsSidewalk: ..' with valid values")
    parser.add_argument("--repair_relation", action="store_true",
                        help="derive RoadVsSidewalk from the predicted Sidewalk and Road (raw text kept)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N distinct images (N >= 1)")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="skip (and count) missing, corrupt and too large images")
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="an image with more pixels is a bad image, refused before it is decoded (a decompression "
                             f"bomb guard; default: {MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--restart_if_changed", action="store_true",
                        help="when --out holds lines this run cannot resume (another model, weights, settings, prompt "
                             "or image, or another tool's file), move it to <out>.previous and start over "
                             "(default: refuse)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU) | cuda | mps | cpu (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on compute capability 8.0 or more, fp16 on older GPUs such as the T4, fp32 on "
                             "CPU and MPS) | bf16 | fp16 | fp32 (default: auto)")

    _configure_backend_cli(parser.add_argument_group("backends (bvip_helpers.backends)"))


def _configure_backend_cli(group: Any) -> None:
    from bvip_helpers import structured
    from bvip_helpers.backends import PROMPT_PRESETS, SCHEMA_FAILURE_CHOICES

    group.add_argument("--backend", choices=BACKENDS, default="transformers",
                       help="transformers (local, default), openai (any OpenAI-compatible server), ollama, "
                       "clip-interrogator (BLIP caption + CLIP-ranked BVIP phrases), chain (see --chain)")
    group.add_argument("--prompt", choices=sorted(PROMPT_PRESETS), default=None,
                       help="caption every image with this preset instead of the records' prompts")
    group.add_argument("--base_url", default=None, help="served backends: the server, e.g. http://127.0.0.1:8000/v1 "
                       "(default: $OPENAI_BASE_URL, or $OLLAMA_HOST for ollama)")
    group.add_argument("--api_key_env", default="OPENAI_API_KEY",
                       help="openai: the environment variable holding the API key (never given on the command line)")
    group.add_argument("--concurrency", type=int, default=4, help="served backends: requests in flight (default: 4)")
    group.add_argument("--timeout", type=float, default=120.0, help="served backends: seconds per request")
    group.add_argument("--retries", type=int, default=4,
                       help="served backends: more tries after a 429, 5xx, timeout or dropped connection")
    group.add_argument("--backoff", type=float, default=1.0, help="served backends: first wait between tries, doubling")
    group.add_argument("--temperature", type=float, default=0.0, help="served backends: 0 = greedy (default)")
    group.add_argument("--seed", type=int, default=None, help="served backends: a sampling seed, sent when given")
    group.add_argument("--structured", choices=structured.DIALECTS, default="none",
                       help="served backends: ask for the caption schema in this server's dialect (vllm-regex, "
                       "vllm-json, llamacpp-grammar, llamacpp-json, json-schema for OpenAI, LM Studio, Ollama)")
    group.add_argument("--on_schema_failure", choices=SCHEMA_FAILURE_CHOICES, default="mark",
                       help="served backends: a caption off the schema is marked (schema_ok: false) or asked again")
    group.add_argument("--image_format", choices=("png", "jpeg"), default="png",
                       help="served backends: how images travel (png is lossless)")
    group.add_argument("--captioner", default=None, help="clip-interrogator: the BLIP caption model (default: blip-large)")
    group.add_argument("--top_k", type=int, default=3, help="clip-interrogator: object phrases kept")
    group.add_argument("--chain", default=None,
                       help="chain: BACKEND:MODEL[@URL],BACKEND:MODEL[@URL],... ; every step after the first "
                       "refines the previous description. A step without @URL: --base_url for openai steps, "
                       "$OLLAMA_HOST for ollama ones")


#: backends whose --model is a model folder here (a served backend's model is the server's name for it)
_LOCAL_BACKENDS = ("transformers", "clip-interrogator")


def _cli_model(backend: str, model: str | None) -> str | None:
    """A local model folder given on the command line resolves against the current directory."""
    from bvip_helpers.io import resolve_cli_path

    if model and backend in _LOCAL_BACKENDS and Path(model).expanduser().is_dir():
        return str(resolve_cli_path(model))
    return model


def _cli_backend(args: argparse.Namespace) -> Any:
    from bvip_helpers.backends import CLIP_INTERROGATOR_CAPTIONER, make_backend, parse_chain

    chain = args.chain and ",".join(f"{kind}:{_cli_model(kind, model)}" + (f"@{url}" if url else "")
                                    for kind, model, url in parse_chain(args.chain))
    served = {"base_url": args.base_url, "api_key_env": args.api_key_env, "concurrency": args.concurrency,
              "timeout": args.timeout, "retries": args.retries, "backoff": args.backoff,
              "temperature": args.temperature, "seed": args.seed, "structured_output": args.structured,
              "on_schema_failure": args.on_schema_failure, "image_format": args.image_format}
    return make_backend(args.backend, _cli_model(args.backend, args.model), adapter=args.adapter,
                        num_beams=args.num_beams, constrained=args.constrained, chain=chain,
                        captioner=_cli_model("transformers", args.captioner) or CLIP_INTERROGATOR_CAPTIONER,
                        top_k=args.top_k, **served)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``--jsonl``; :class:`ValueError` naming the file and line for a bad one."""
    from bvip_helpers.io import numbered_jsonl

    if not path.is_file():
        raise ValueError(f"--jsonl {path}: no such file; pass the records file, e.g. data/bvpi_out/bvpi_sft_test.jsonl")
    records = []
    for number, record in numbered_jsonl(path):
        if not (record.get("image") or record.get("images")):
            raise ValueError(f"{path}: line {number} has no 'image' (or 'images'); every record names its image")
        records.append(record)
    return records


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.backends import PROMPT_PRESETS
    from bvip_helpers.registry import UnknownModelError

    try:
        if args.out.resolve() == args.jsonl.resolve():
            raise ValueError(f"--out {args.out} is the --jsonl records file itself: the predictions would be "
                             "appended to the records; write them to another file")
        records = read_records(args.jsonl)
        if args.prompt:
            records = [{"image": record_image_path(r), "prompt": PROMPT_PRESETS[args.prompt]} for r in records]
        if args.backend == "transformers":  # the local path: predict loads it once --out is locked
            model = _cli_model("transformers", args.model)
            if not model:
                raise ValueError("--model is required (a registry name, hub id or model folder)")
        else:
            model = _cli_backend(args)
        stats = predict(model, records, args.image_root, args.out, adapter=args.adapter,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                        constrained=args.constrained, repair_relation_field=args.repair_relation, limit=args.limit,
                        skip_bad_images=args.skip_bad_images, restart_if_changed=args.restart_if_changed,
                        progress=not args.no_progress, max_image_pixels=args.max_image_pixels, device=args.device,
                        dtype=args.dtype)
    except (ImagePathError, JsonlError, OutputLockedError, ValueError, BackendError) as err:  # DevicePolicyError,
        print(f"bvip predict: error: {err}", file=sys.stderr)                                # ModelLoadError too
        return 2
    except UnknownModelError as err:
        print(f"bvip predict: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not concerns(err, args.out):
            print(f"bvip predict: error: {os_error_line(err)}", file=sys.stderr)
            return 2
        print(f"bvip predict: error: cannot write {os_error_line(err)}. Lines already written are kept: make "
              "--out writable (or free disk space) and rerun the same command to resume", file=sys.stderr)
        return 2
    print(stats.summary())
    summary = {k: v for k, v in asdict(stats).items() if k not in ("bad_images", "failed")}
    print(json.dumps({**summary, "failed": len(stats.failed)}, default=str))
    return 1 if stats.failed else 0
