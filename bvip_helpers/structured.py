"""Structured output for served models: one caption schema, each server's dialect of it, and the local check.

A served model (``bvip predict --backend openai|ollama``, :mod:`bvip_helpers.backends`) can be asked to
write a caption that fits the BVIP schema. Every server spells that request its own way, so the one
schema here is rendered into each dialect:

=================== ============================================================ ==================
``--structured``    what is sent                                                 the server answers
=================== ============================================================ ==================
``none``            nothing (the caption is only checked locally)                caption text
``vllm-regex``      ``structured_outputs: {"regex": CAPTION_REGEX}`` (vLLM)      caption text
``vllm-json``       ``structured_outputs: {"json": CAPTION_JSON_SCHEMA}`` (vLLM) JSON object
``llamacpp-grammar`` ``grammar: CAPTION_GBNF`` (llama.cpp's server)              caption text
``llamacpp-json``   ``json_schema: CAPTION_JSON_SCHEMA`` (llama.cpp's server)    JSON object
``json-schema``     ``response_format`` of type ``json_schema`` (OpenAI, LM       JSON object
                    Studio, Ollama's ``/v1``); the ``ollama`` backend sends
                    ``format: CAPTION_JSON_SCHEMA`` instead
=================== ============================================================ ==================

The schema: the three mandatory fields as enums (:data:`bvip_helpers.schema.FIELD_ENUMS`), then the
``Nearby``, ``Far`` and ``Context`` lines as strings. A JSON answer is written back into caption text by
:func:`caption_from_json` with the :mod:`bvip_helpers.schema` helpers, so every dialect gives the same text.

Servers that cannot constrain (``transformers serve`` ignores ``response_format`` and answers 422 to
fields it does not know), and any server asked with ``none``, still have every caption checked here
(:func:`check_caption`); ``bvip predict`` counts the captions that fail and retries or marks them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bvip_helpers import schema

#: The ``--structured`` choices.
DIALECTS = ("none", "vllm-regex", "vllm-json", "llamacpp-grammar", "llamacpp-json", "json-schema")
#: Dialects whose answer is a JSON object (turned into caption text by :func:`caption_from_json`).
JSON_DIALECTS = frozenset({"vllm-json", "llamacpp-json", "json-schema"})
#: Longest free-text line a structured answer may hold (characters), so a constrained model cannot ramble.
MAX_LINE_CHARS = 400

_FIELDS = tuple(schema.FIELD_LABELS)  # sidewalk_pos, road_pos, road_vs_sidewalk: the caption's order

CAPTION_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{key: {"type": "string", "enum": list(schema.FIELD_ENUMS[key]),
                 "description": f"the caption's {label} field"} for key, label in schema.FIELD_LABELS.items()},
        "nearby": {"type": "string", "maxLength": MAX_LINE_CHARS,
                   "description": "the close objects and the side of each, e.g. 'a person close on the left; "
                   f"2 cars close on the right', or '{schema.NOTHING_CLOSE}'"},
        "far": {"type": "string", "maxLength": MAX_LINE_CHARS,
                "description": "the objects farther away and their sides; empty when there are none"},
        "context": {"type": "string", "maxLength": MAX_LINE_CHARS, "description": "one sentence about the scene"},
    },
    # OpenAI's strict mode wants every property required and nothing else allowed.
    "required": [*_FIELDS, "nearby", "far", "context"],
    "additionalProperties": False,
}


def _mandatory_line(values: dict[str, str]) -> str:
    """The mandatory first line with each value replaced by ``values[key]`` (literal text escaped by the caller)."""
    return schema.mandatory_prefix(*(values[key] for key in _FIELDS))


def _regex_literal(text: str) -> str:
    """``text`` as a regex, escaping only the metacharacters (``re.escape`` also escapes spaces, which not every
    server's regex engine reads)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text).replace("\n", "\\n")


def _mandatory_regex() -> str:
    marks = {key: f"\x00{key}\x00" for key in _FIELDS}
    parts = re.split(r"\x00(\w+)\x00", _mandatory_line(marks))  # literal, key, literal, key, ...
    return "".join("(" + "|".join(schema.FIELD_ENUMS[p]) + ")" if i % 2 else _regex_literal(p)
                   for i, p in enumerate(parts))


_LINE = rf"[^\n]{{1,{MAX_LINE_CHARS}}}"
#: The whole caption as a regular expression (vLLM's regex dialect): mandatory line, Nearby, optional Far, Context.
CAPTION_REGEX = rf"{_mandatory_regex()}\nNearby: {_LINE}\n(Far: {_LINE}\n)?Context: {_LINE}"


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _gbnf() -> str:
    rules = {key: f"f{i}" for i, key in enumerate(_FIELDS)}
    marks = {key: f"\x00{key}\x00" for key in _FIELDS}
    parts = re.split(r"\x00(\w+)\x00", _mandatory_line(marks))  # literal, key, literal, key, ...
    sequence = " ".join(rules[p] if i % 2 else _gbnf_literal(p) for i, p in enumerate(parts) if p)
    lines = [f'root ::= {sequence} "\\nNearby: " line "\\n" ("Far: " line "\\n")? "Context: " line',
             *(f"{rules[key]} ::= " + " | ".join(_gbnf_literal(v) for v in schema.FIELD_ENUMS[key]) for key in _FIELDS),
             r"line ::= [^\n]+"]
    return "\n".join(lines) + "\n"


#: The caption as a GBNF grammar (llama.cpp's ``grammar`` field).
CAPTION_GBNF = _gbnf()


def request_fields(dialect: str) -> dict[str, Any]:
    """The extra chat-completions fields that ask an OpenAI-compatible server for ``dialect``."""
    if dialect not in DIALECTS:
        raise ValueError(f"structured output {dialect!r}: choose one of {', '.join(DIALECTS)}")
    return {
        "none": {},
        "vllm-regex": {"structured_outputs": {"regex": CAPTION_REGEX}},
        "vllm-json": {"structured_outputs": {"json": CAPTION_JSON_SCHEMA}},
        "llamacpp-grammar": {"grammar": CAPTION_GBNF},
        "llamacpp-json": {"json_schema": CAPTION_JSON_SCHEMA},
        "json-schema": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "bvip_caption", "strict": True, "schema": CAPTION_JSON_SCHEMA}}},
    }[dialect]


# --- Back to caption text, and the local check ---------------------------------


def _sentence(text: str) -> str:
    text = " ".join(str(text).split()).rstrip(".")
    return text + "." if text else ""


def caption_from_json(answer: dict[str, Any]) -> str:
    """The caption text of a JSON answer that fits :data:`CAPTION_JSON_SCHEMA` (see :func:`parse_json_answer`)."""
    lines = [_mandatory_line({key: answer[key] for key in _FIELDS}),
             "Nearby: " + (_sentence(answer["nearby"]) or schema.NOTHING_CLOSE + ".")]
    if _sentence(answer.get("far", "")):
        lines.append("Far: " + _sentence(answer["far"]))
    context = " ".join(str(answer["context"]).split())
    if context:
        lines.append("Context: " + context)
    return "\n".join(lines)


def parse_json_answer(content: str) -> tuple[dict[str, Any] | None, list[str]]:
    """``(answer, problems)``: the JSON object of a structured answer, or ``None`` with what is wrong with it."""
    try:
        answer = json.loads(content)
    except ValueError as err:
        return None, [f"not JSON ({err})"]
    if not isinstance(answer, dict):
        return None, ["not a JSON object"]
    problems = []
    for key in CAPTION_JSON_SCHEMA["required"]:
        if key not in answer:
            problems.append(f"missing {key!r}")
        elif not isinstance(answer[key], str):
            problems.append(f"{key!r} is not a string")
        elif key in schema.FIELD_ENUMS and answer[key] not in schema.FIELD_ENUMS[key]:
            problems.append(f"{key!r} is {answer[key]!r}, not one of {', '.join(schema.FIELD_ENUMS[key])}")
    extra = sorted(set(answer) - set(CAPTION_JSON_SCHEMA["properties"]))
    if extra:
        problems.append(f"unexpected keys {extra}")
    return (None, problems) if problems else (answer, [])


_MANDATORY_LINE = re.compile(_mandatory_regex())
_CAPTION = re.compile(rf"{_mandatory_regex()}\nNearby: [^\n]+\n(Far: [^\n]+\n)?Context: [^\n]*\S[^\n]*")


def check_caption(text: str) -> list[str]:
    """What keeps ``text`` from being a schema caption (``[]`` when it is one).

    The schema: the mandatory line exactly (valid values only), a ``Nearby:`` line, an optional ``Far:``
    line and a non-empty ``Context:`` line, in that order and nothing else.
    """
    text = (text or "").strip()
    if _CAPTION.fullmatch(text):
        return []
    lines = text.split("\n")
    if not _MANDATORY_LINE.fullmatch(lines[0]):
        fields = schema.parse_caption(text).fields
        missing = [schema.FIELD_LABELS[k] for k in _FIELDS if fields.get(k) is None]
        return ["the first line is not 'Sidewalk: <value>. Road: <value>. RoadVsSidewalk: <value>.'"
                + (f" (no valid {', '.join(missing)})" if missing else "")]
    heads = [line.split(":", 1)[0] for line in lines[1:]]
    if heads[:1] != ["Nearby"]:
        return ["no 'Nearby:' line after the mandatory line"]
    if heads[-1:] != ["Context"] or heads.count("Context") != 1:
        return ["no single 'Context:' line at the end"]
    return ["lines other than Nearby, an optional Far and Context, or an empty one"]
