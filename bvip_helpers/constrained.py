"""Schema-constrained decoding and relation consistency for predicted captions.

``bvip predict --constrained`` makes ANY model, even a randomly initialised one, begin
its caption with the three mandatory fields spelled exactly as the schema requires::

    Sidewalk: <value>. Road: <value>. RoadVsSidewalk: <value>.\\n

The literal parts are forced and every value is restricted to the enum values of
:data:`bvip_helpers.schema.FIELD_ENUMS`. The model still *chooses* each value (the
highest-scoring allowed token wins, or beam search ranks the allowed continuations);
the constraint only guarantees the format. After the newline the model continues freely.

How: every possible mandatory line (4 x 5 x 4 = 80 strings) is encoded with the model's
own tokenizer and stored in a token trie. At each step a :class:`MandatoryFieldsProcessor`
walks the trie with the tokens generated so far and masks every token that is not a
child of the current node. Encoding whole lines (not field by field) keeps the token
boundaries the tokenizer itself would produce, which is what a fine-tuned model has seen.

The relation field can still contradict the two positions (the model picks it); the
helpers :func:`relation_consistency` and :func:`repair_relation` measure and, on request,
fix that, always recording the raw text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bvip_helpers import schema

# The forced text between the values; the first line of a caption is
# PREFIXES[0] + sidewalk + PREFIXES[1] + road + PREFIXES[2] + relation + PREFIXES[3].
FIELD_ORDER = ("sidewalk_pos", "road_pos", "road_vs_sidewalk")
PREFIXES = ("Sidewalk: ", ". Road: ", ". RoadVsSidewalk: ", ".\n")


def mandatory_lines() -> list[str]:
    """Every allowed mandatory first line (with its trailing newline)."""
    enums = [schema.FIELD_ENUMS[key] for key in FIELD_ORDER]
    return [
        f"{PREFIXES[0]}{s}{PREFIXES[1]}{r}{PREFIXES[2]}{rel}{PREFIXES[3]}"
        for s, r, rel in itertools.product(*enums)
    ]


class TokenTrie:
    """A trie over token-id sequences; ``allowed(prefix)`` lists the next legal ids.

    ``allowed`` returns ``None`` once ``prefix`` has completed a sequence (or left the
    trie), meaning "no constraint any more".
    """

    _END = -1

    def __init__(self, sequences: Iterable[Sequence[int]]):
        self.root: dict[int, dict] = {}
        self.n_sequences = 0
        for seq in sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(int(token), {})
            node[self._END] = {}
            self.n_sequences += 1
        self._cache: dict[tuple[int, ...], list[int] | None] = {}

    def allowed(self, prefix: Sequence[int]) -> list[int] | None:
        key = tuple(prefix)
        if key not in self._cache:
            node = self.root
            result: list[int] | None = None
            for token in key:
                if self._END in node and token not in node:
                    node = None  # a full line is done; anything after it is free
                    break
                node = node.get(token)
                if node is None:
                    break
            if node is not None:
                children = [t for t in node if t != self._END]
                # a node that ends a line AND continues (cannot happen with a trailing
                # newline, but stay safe): leave it free rather than forcing a longer line.
                result = None if (self._END in node and children) or not children else sorted(children)
            self._cache[key] = result
        return self._cache[key]


def _tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def mandatory_trie(processor_or_tokenizer: Any) -> TokenTrie:
    """The trie of the tokenizer's encodings of all :func:`mandatory_lines`."""
    tok = _tokenizer_of(processor_or_tokenizer)
    sequences = [tok.encode(line, add_special_tokens=False) for line in mandatory_lines()]
    for line, seq in zip(mandatory_lines(), sequences, strict=True):
        # Decoding must give the line back, or the "guarantee" would be about tokens only.
        if tok.decode(seq, skip_special_tokens=True).strip() != line.strip():
            raise ValueError(f"tokenizer {type(tok).__name__} does not round-trip {line!r}; "
                             "constrained decoding needs a lossless tokenizer")
    return TokenTrie(sequences)


def _logits_processor_base() -> type:
    from transformers import LogitsProcessor

    return LogitsProcessor


class MandatoryFieldsProcessor(_logits_processor_base()):
    """Mask every token that would leave the mandatory-line trie.

    Create one per ``generate`` call: the first call records the prompt length (with left
    padding all rows share it; for encoder-decoder models it is the decoder start), and
    every row, beams included, is then walked independently.
    """

    def __init__(self, trie: TokenTrie):
        self.trie = trie
        self.prompt_len: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        generated = input_ids[:, self.prompt_len:].tolist()
        mask = torch.zeros_like(scores)
        for row, ids in enumerate(generated):
            allowed = self.trie.allowed(ids)
            if allowed is not None:
                mask[row].fill_(float("-inf"))
                mask[row, allowed] = 0.0
        return scores + mask


def constrained_generate_kwargs(processor_or_tokenizer: Any, trie: TokenTrie | None = None) -> dict[str, Any]:
    """Extra ``model.generate`` keyword arguments that switch the constraint on (fresh per call)."""
    from transformers import LogitsProcessorList

    trie = trie or mandatory_trie(processor_or_tokenizer)
    return {"logits_processor": LogitsProcessorList([MandatoryFieldsProcessor(trie)])}


# --- Relation consistency ---------------------------------------------------

_RELATION_VALUE = re.compile(r"(roadvssidewalk\s*:\s*)(left_of|right_of|crossing_front|unknown)\b", re.I)


@dataclass
class RelationCheck:
    """Whether a caption's RoadVsSidewalk agrees with its own Sidewalk and Road."""

    predicted: str | None
    derived: str | None  # None when Sidewalk or Road is missing
    contradicts: bool


def check_relation(text: str) -> RelationCheck:
    fields = schema.parse_caption(text).fields
    sidewalk, road, relation = (fields.get(k) for k in FIELD_ORDER)
    if sidewalk is None or road is None:
        return RelationCheck(relation, None, False)
    derived = schema.derive_relation(sidewalk, road)
    return RelationCheck(relation, derived, relation is not None and relation != derived)


def relation_consistency(texts: Iterable[str]) -> dict[str, Any]:
    """How often RoadVsSidewalk contradicts the caption's own Sidewalk and Road.

    ``rate`` is over captions where all three fields parse (``checked``).
    """
    checks = [check_relation(t) for t in texts]
    checked = [c for c in checks if c.predicted is not None and c.derived is not None]
    contradictions = sum(c.contradicts for c in checked)
    return {"n": len(checks), "checked": len(checked), "contradictions": contradictions,
            "rate": contradictions / len(checked) if checked else 0.0}


def repair_relation(text: str) -> tuple[str, bool]:
    """Replace RoadVsSidewalk by :func:`schema.derive_relation` of the predicted positions.

    Returns ``(text, changed)``. Captions without both positions, or without a relation
    field to replace, come back unchanged.
    """
    check = check_relation(text)
    if not check.contradicts or check.derived is None:
        return text, False
    repaired = _RELATION_VALUE.sub(lambda m: m.group(1) + check.derived, text, count=1)
    return repaired, repaired != text
