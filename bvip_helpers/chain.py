"""A chain of experts: backends in a row, each after the first refining the description so far.

The source project captions with several models in a row (CLIP-Interrogator or BLIP-2 FlanT5 first, then
LLaVA, Qwen2-VL or an API): every later model receives the previous description and is asked to add the
visual details it misses. Here the request is BVIP-first, close hazards and their sides, and each step's
text is kept on the output line (``steps``), so a notebook can score every expert
(:func:`chain_step_predictions`) and see what each one added and whether it was there
(:func:`chain_additions`)::

    bvip predict --backend chain --chain transformers:blip2-flan-t5-xl,openai:Qwen/Qwen2-VL-7B-Instruct@http://127.0.0.1:8000/v1 ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bvip_helpers import schema
from bvip_helpers.backends import Backend, CaptionResult

#: What every expert after the first in a chain is asked; ``{previous}`` is the description so far.
REFINE_PROMPT = (
    "Another model described this street scene for a blind pedestrian:\n{previous}\n"
    "Look at the image again and add the visual details that description misses, most important first: "
    "close hazards (obstacles, people, bicycles, cars) and the side each one is on. Keep what is right, "
    "correct what is wrong, and write the whole description again. " + schema.DEFAULT_PROMPT
)



class ChainBackend(Backend):
    """Backends in a row: the first captions from the records' prompt, every later one gets
    :data:`REFINE_PROMPT` with the description so far. The last text is the caption; ``steps`` on each
    output line keeps every expert's text, so what each one added (and whether it made things up) can be scored.
    """

    name = "chain"

    def __init__(self, steps: Sequence[Backend], refine_prompt: str = REFINE_PROMPT):
        if len(steps) < 2:
            raise ValueError("a chain needs at least two backends")
        if "{previous}" not in refine_prompt:
            raise ValueError("the refine prompt must hold '{previous}', where the description so far goes")
        self.steps, self.refine_prompt = list(steps), refine_prompt
        self.model_name = " -> ".join(step.model_name for step in self.steps)
        self.concurrency = max(step.concurrency for step in self.steps)
        self.do_sample = any(step.do_sample for step in self.steps)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [step.settings() for step in self.steps], "refine_prompt": self.refine_prompt}

    def weights_id(self) -> str | None:
        return "|".join(filter(None, (step.weights_id() for step in self.steps))) or None

    def caption(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int) -> list[CaptionResult]:
        current = self.steps[0].caption(images, prompts, max_new_tokens=max_new_tokens)
        history = [[self._step(0, result)] for result in current]
        for number, step in enumerate(self.steps[1:], start=1):
            alive = [i for i, result in enumerate(current) if result.ok]
            if not alive:
                break
            refine = [self.refine_prompt.replace("{previous}", current[i].text or "") for i in alive]
            for i, result in zip(alive, step.caption([images[i] for i in alive], refine,
                                                     max_new_tokens=max_new_tokens), strict=True):
                current[i] = result
                history[i].append(self._step(number, result))
        results = []
        for result, steps in zip(current, history, strict=True):
            failed = next((s for s in steps if "error" in s), None)
            error = f"step {failed['step']} ({failed['backend']}:{failed['model']}): {failed['error']}" if failed else None
            results.append(CaptionResult(result.text if not failed else None, error,
                                         {**(result.extra if not failed else {}), "steps": steps}))
        return results

    def _step(self, index: int, result: CaptionResult) -> dict[str, Any]:
        step = self.steps[index]
        record: dict[str, Any] = {"step": index + 1, "backend": step.name, "model": step.model_name, "text": result.text}
        if not result.ok:
            record["error"] = result.error
        elif "schema_ok" in result.extra:
            record["schema_ok"] = result.extra["schema_ok"]
        return record

    def close(self) -> None:
        for step in self.steps:
            step.close()


def chain_step_predictions(lines: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each chain step's captions as a predictions list of its own (``{"image", "text"}``), keyed
    ``step N (backend:model)``, so the evaluator scores what every expert wrote."""
    steps: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for step in line.get("steps") or []:
            if step.get("text") is not None:
                key = f"step {step['step']} ({step['backend']}:{step['model']})"
                steps.setdefault(key, []).append({"image": line["image"], "text": step["text"]})
    return steps


def chain_additions(lines: Sequence[Mapping[str, Any]], truth: Mapping[str, str]) -> list[dict[str, Any]]:
    """What each step after the first added to the close objects, and how much of it is there.

    ``truth`` maps an image to its priority caption (the ground truth's ``response``). A close object class
    a step names that the step before did not is an addition; it is *confirmed* when the truth has it close
    and *invented* (a hallucination) when not. One row per step: images, additions, confirmed, invented.
    """
    rows: dict[int, dict[str, Any]] = {}
    for line in lines:
        steps = line.get("steps") or []
        wanted = truth.get(str(line.get("image")))
        if wanted is None:
            continue
        close = set(schema.parse_caption(wanted).near)
        for before, after in zip(steps, steps[1:], strict=False):
            if before.get("text") is None or after.get("text") is None:
                continue
            added = set(schema.parse_caption(after["text"]).near) - set(schema.parse_caption(before["text"]).near)
            row = rows.setdefault(after["step"], {"step": after["step"], "expert": f"{after['backend']}:{after['model']}",
                                                  "images": 0, "added": 0, "confirmed": 0, "invented": 0})
            row["images"] += 1
            row["added"] += len(added)
            row["confirmed"] += len(added & close)
            row["invented"] += len(added - close)
    return [rows[k] for k in sorted(rows)]
