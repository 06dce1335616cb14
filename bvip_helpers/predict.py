"""Batched, resumable caption generation: ``bvip predict``.

::

    bvip predict --model tiny-qwen2-vl --adapter runs/tiny-qwen2-vl/sft \\
        --jsonl data/bvpi_out/bvpi_sft_test.jsonl --image_root data/synthetic \\
        --out runs/tiny-qwen2-vl/preds_test.jsonl --batch_size 16 [--constrained]

Each finished batch is appended (fsync'd) to ``--out`` as one JSON line per image with
``image``, ``text``, ``model``, ``adapter`` and the generation parameters, which
``bvip evaluate`` reads directly. A rerun skips images already in the file, so a killed
run resumes where it stopped; a truncated last line (killed mid-write) is dropped, the
file rewritten atomically and the drop reported. A file written with other generation
parameters is refused rather than mixed.

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
    ImagePathError,
    JsonlError,
    append_jsonl,
    load_image,
    parse_json_object,
    safe_image_path,
    write_jsonl,
)

#: output keys that must match between a file being resumed and the current run.
RUN_KEYS = ("model", "adapter", "weights", "max_new_tokens", "num_beams", "constrained", "repair_relation")


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


def load(model: Any, adapter: str | os.PathLike[str] | None = None, **kwargs: Any) -> LoadedModel:
    """Resolve ``model`` (registry name, hub id, local dir or registry spec) and load it, plus a PEFT ``adapter``."""
    from bvip_helpers.registry import get_spec, load_model_and_processor

    spec = get_spec(str(model) if isinstance(model, (str, os.PathLike)) else model)
    loaded_model, processor = load_model_and_processor(spec, adapter=str(adapter) if adapter else None, **kwargs)
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


def recover_output(out_path: Path) -> tuple[list[dict[str, Any]], int]:
    """Read an existing output file; drop a truncated LAST line (rewriting the file atomically).

    Returns ``(records, dropped)``. A malformed line anywhere else is not a kill artefact and
    raises :class:`JsonlError` naming the line.
    """
    if not out_path.exists():
        return [], 0
    raw = out_path.read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail is '' when the file ends with a newline
    records: list[dict[str, Any]] = []
    dropped = 0
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = parse_json_object(line)
        except ValueError as err:
            if number == len(complete) and not tail.strip():
                dropped += 1  # the last line is broken though newline-terminated: still the kill's
                continue
            raise JsonlError(f"{out_path}: line {number} is not a JSON object ({err}); this is not a truncated "
                             "last line from an interrupted run. Fix or delete that line, or use another --out.") from err
        records.append(record)
    if tail.strip():
        try:
            records.append(parse_json_object(tail))  # a complete record that only lacks its newline
        except ValueError:
            dropped += 1
    if dropped or tail.strip():
        write_jsonl(out_path, records)
    return records, dropped


def weights_id(loaded: LoadedModel) -> str | None:
    """Size and mtime of the local weight files (adapter and base), so retrained weights never resume old captions.

    ``None`` for hub checkpoints (their revision is fixed by the hub cache).
    """
    from bvip_helpers.io import resolve

    folders = [resolve(loaded.adapter)] if loaded.adapter else []
    source = Path(str(getattr(loaded.spec, "hub_id", "") or ""))
    if str(source) and resolve(source).is_dir():
        folders.append(resolve(source))
    stamps = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
              for folder in folders for f in sorted(folder.glob("*.safetensors"))]
    return "|".join(stamps) or None


def _check_same_run(existing: list[dict[str, Any]], run: dict[str, Any], out_path: Path) -> str | None:
    """``None`` when every existing line was made with this run's settings, else what differs."""
    for record in existing:
        different = {k: (record.get(k), run[k]) for k in RUN_KEYS if k in record and record.get(k) != run[k]}
        if record.get("backend") != run.get("backend"):  # another backend's settings (absent on the local path)
            different["backend"] = (record.get("backend"), run.get("backend"))
        if different:
            return ", ".join(f"{k}: file has {a!r}, this run {b!r}" for k, (a, b) in different.items())
    return None


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
            restart_if_changed: bool = False, progress: bool = True) -> PredictStats:
    """Generate captions for ``records`` (dicts with ``image`` and optionally ``prompt``) into ``out_path``.

    ``model_or_spec``: a :class:`LoadedModel`, a backend of :mod:`bvip_helpers.backends`, or anything
    :func:`load` accepts (registry name, spec, hub id, local dir), loaded with ``adapter``. Resumes an existing
    ``out_path`` made with the same model weights and settings (another file is refused, or
    started over with ``restart_if_changed``). A missing or corrupt image raises :class:`ImagePathError` naming it,
    unless ``skip_bad_images`` (then it is counted in ``stats.bad_images``).
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, num_beams and max_new_tokens must be >= 1")
    backend = as_backend(model_or_spec, adapter, num_beams=num_beams, constrained=constrained)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = PredictStats(out_path=str(out_path))
    start = time.perf_counter()

    run = {"model": backend.model_name, "adapter": backend.adapter, "weights": backend.weights_id(),
           "max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": backend.do_sample,
           "constrained": constrained, "repair_relation": repair_relation_field, **backend.run_settings()}
    existing, stats.dropped_partial_lines = recover_output(out_path)
    if stats.dropped_partial_lines:
        print(f"predict: dropped {stats.dropped_partial_lines} truncated line(s) at the end of {out_path} "
              "(an interrupted run) and rewrote it before resuming", file=sys.stderr)
    different = _check_same_run(existing, run, out_path)
    if different and not restart_if_changed:
        raise ValueError(f"{out_path} holds predictions made with other settings ({different}); use another "
                         "--out, delete the file, or pass --restart_if_changed to start it over")
    if different:
        print(f"predict: {out_path} was made with other settings ({different}); starting it over", file=sys.stderr)
        out_path.unlink()
        existing = []
    done = {str(r.get("image")) for r in existing}

    unique: dict[str, Mapping[str, Any]] = {}
    for number, record in enumerate(records, start=1):
        if not (record.get("image") or record.get("images")):
            raise ValueError(f"record {number} has no 'image' (or 'images') key")
        key = record_image_path(dict(record))
        if key in unique:
            stats.duplicate_records += 1
            continue
        unique[key] = record
        if limit is not None and len(unique) >= limit:
            break
    stats.total = len(unique)
    pending = [r for key, r in unique.items() if key not in done]
    stats.already_done = stats.total - len(pending)

    # Check every pending image first: a bad file should stop the run before any compute is spent.
    usable: list[tuple[Mapping[str, Any], Path]] = []
    for record in pending:
        try:
            path = safe_image_path(image_root, record_image_path(dict(record)))
            load_image(path)
        except ImagePathError as err:
            if not skip_bad_images:
                raise ImagePathError(f"{err}. Fix the image or --image_root, or pass --skip_bad_images "
                                     "to skip and count bad images") from err
            stats.bad_images.append(str(err))
            continue
        usable.append((record, path))
    if stats.bad_images:
        print(f"predict: skipped {len(stats.bad_images)} bad image(s): " + "; ".join(stats.bad_images[:5])
              + (" ..." if len(stats.bad_images) > 5 else ""), file=sys.stderr)

    # Similar prompt lengths in one batch mean less padding.
    usable.sort(key=lambda item: (len(prompt_of(item[0])), str(item[1])))
    texts: list[str] = []
    bar = tqdm(total=len(usable), desc=f"predict {backend.model_name}", unit="img", disable=not progress)
    step = max(batch_size, backend.concurrency)  # a served backend gets enough images to keep its requests busy
    for begin in range(0, len(usable), step):
        batch = usable[begin: begin + step]
        images = [load_image(path) for _, path in batch]
        prompts = [prompt_of(record) for record, _ in batch]
        generated = backend.caption(images, prompts, max_new_tokens=max_new_tokens)
        lines = []
        for (record, _), result in zip(batch, generated, strict=True):
            if not result.ok:  # nothing arrived: reported, and left for the next run to retry
                stats.failed.append(f"{record_image_path(dict(record))}: {result.error}")
                continue
            text = result.text
            stats.schema_failures += result.extra.get("schema_ok") is False
            line = {"image": record_image_path(dict(record)), "text": text, **run, **result.extra}
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
    parser.add_argument("--out", type=resolve_cli_path, required=True, help="predictions JSONL (appended to; a rerun resumes)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per generation batch (default: 8)")
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="longest caption in tokens (default: 128)")
    parser.add_argument("--num_beams", type=int, default=1, help="1 = greedy")
    parser.add_argument("--constrained", action="store_true",
                        help="force 'Sidewalk: .. Road: .. RoadVsSidewalk: ..' with valid values")
    parser.add_argument("--repair_relation", action="store_true",
                        help="derive RoadVsSidewalk from the predicted Sidewalk and Road (raw text kept)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N distinct images")
    parser.add_argument("--skip_bad_images", action="store_true", help="skip (and count) missing/corrupt images")
    parser.add_argument("--restart_if_changed", action="store_true",
                        help="start --out over when it was made with other weights or settings (default: refuse)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
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
                       "refines the previous description")


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


def run_cli(args: argparse.Namespace) -> int:
    from bvip_helpers.backends import PROMPT_PRESETS
    from bvip_helpers.io import iter_jsonl

    records = list(iter_jsonl(args.jsonl))
    if args.prompt:
        records = [{"image": record_image_path(r), "prompt": PROMPT_PRESETS[args.prompt]} for r in records]
    try:
        if args.backend == "transformers":  # today's path: predict loads the model itself
            model = _cli_model("transformers", args.model)
            if not model:
                raise ValueError("--model is required (a registry name, hub id or model folder)")
        else:
            model = _cli_backend(args)
        stats = predict(model, records, args.image_root, args.out, adapter=args.adapter,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                        constrained=args.constrained, repair_relation_field=args.repair_relation, limit=args.limit,
                        skip_bad_images=args.skip_bad_images, restart_if_changed=args.restart_if_changed,
                        progress=not args.no_progress)
    except (ImagePathError, JsonlError, ValueError, BackendError, OSError) as err:  # OSError: a model folder
        print(f"bvip predict: error: {err}", file=sys.stderr)
        return 2
    print(stats.summary())
    summary = {k: v for k, v in asdict(stats).items() if k not in ("bad_images", "failed")}
    print(json.dumps({**summary, "failed": len(stats.failed)}, default=str))
    return 1 if stats.failed else 0
