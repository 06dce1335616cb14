"""Zero-shot captioning backends behind one interface, and a chain of experts: ``bvip predict --backend``.

A backend takes images and prompts and returns one :class:`CaptionResult` per image: a caption, or the
reason it failed. :func:`bvip_helpers.predict.predict` drives any of them with the same resumable output
file, and the backend's :meth:`Backend.settings` join each output line, so a file is only ever resumed by
the same backend, model and settings.

- ``transformers`` (:class:`TransformersBackend`, the default): the local, batched path of ``bvip predict``.
- ``openai`` (:class:`OpenAIBackend`): any OpenAI-compatible chat-completions server (vLLM, ``transformers
  serve``, llama.cpp's server, LM Studio, a hosted API). This is how the course reaches a multi-GPU vLLM
  deployment: the notebook sends requests, the server batches them.
- ``ollama`` (:class:`OllamaBackend`): Ollama's native ``/api/chat`` (raw base64 images, ``format`` for the schema).
- ``clip-interrogator`` (:class:`ClipInterrogatorBackend`): CLIP-Interrogator's method, a BLIP caption plus
  the phrases of a BVIP vocabulary ranked by CLIP image-text similarity.
- ``chain`` (:class:`bvip_helpers.chain.ChainBackend`): a chain of experts; every model after the first gets
  the previous description and adds what it misses, close hazards and their sides first. Each step's text is kept.

Served backends send images as base64 PNG (lossless: the server decodes exactly the pixels the local path
sees), ``max_tokens`` and ``temperature=0`` unless sampling is asked for, run up to ``concurrency``
requests at a time, and retry 429, 5xx, timeouts and dropped connections with exponential backoff. A
request that failed for good is reported for its image; a failure that no retry can mend (a refused API
key, a wrong URL or model, a refused field) stops the run with one clear line. The API key comes from a
parameter or an environment variable and is never logged or written. Structured output is asked for in
the server's own dialect (:mod:`bvip_helpers.structured`), and every served caption is checked against the
schema here: the failures are counted, then retried or marked (``schema_ok: false``), as the user chooses.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from bvip_helpers import schema, structured

#: The ``bvip predict --backend`` choices.
BACKENDS = ("transformers", "openai", "ollama", "clip-interrogator", "chain")

#: Prompt presets: the plain captioning instruction and the BVIP instruction (the records' default).
PROMPT_PRESETS = {"plain": schema.PLAIN_PROMPT, "bvip": schema.DEFAULT_PROMPT}

#: HTTP answers worth another try: rate limits and server trouble (every 5xx but 501, see :func:`retryable`).
RETRY_STATUS = frozenset({408, 409, 429})


def retryable(status: int) -> bool:
    """Rate limits, conflicts, timeouts and server errors; not 501 (the server lacks the feature: no retry mends it)."""
    return status in RETRY_STATUS or (500 <= status < 600 and status != 501)

#: HTTP answers that no retry mends: the key, the URL or the model is wrong.
FATAL_STATUS = frozenset({401, 403, 404})
SCHEMA_FAILURE_CHOICES = ("mark", "retry")


@dataclass
class CaptionResult:
    """One image's answer: ``text``, or ``text=None`` and the ``error`` that kept it from arriving.

    ``extra`` joins the output line (``schema_ok``, a JSON answer's ``text_raw``, a chain's ``steps``).
    """

    text: str | None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.text is not None


class BackendError(RuntimeError):
    """A backend that cannot work at all (wrong URL or model, refused key or field): the run stops."""


class Backend:
    """The interface: ``caption(images, prompts, max_new_tokens=...) -> [CaptionResult]`` plus a name and settings."""

    name = "backend"
    model_name = ""
    adapter: str | None = None
    #: the local :class:`bvip_helpers.predict.LoadedModel`, for backends that hold one
    loaded: Any = None
    #: images worth sending at once (requests in flight for a server; predict sends at least this many)
    concurrency = 1
    do_sample = False

    def settings(self) -> dict[str, Any]:
        """What decides the captions besides the prompt and ``max_new_tokens``: part of the run's identity."""
        raise NotImplementedError

    def run_settings(self) -> dict[str, Any]:
        """The keys this backend adds to every output line of ``bvip predict``."""
        return {"backend": self.settings()}

    def weights_id(self) -> str | None:
        return None

    def caption(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int) -> list[CaptionResult]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (a local model)."""

    def label(self) -> str:
        return f"{self.name}:{self.model_name}"


# --- The local path ----------------------------------------------------------------


class TransformersBackend(Backend):
    """A model loaded in this process (:func:`bvip_helpers.predict.load`), batched and left-padded."""

    name = "transformers"

    def __init__(self, loaded: Any, *, num_beams: int = 1, constrained: bool = False):
        self.loaded, self.num_beams, self.constrained = loaded, num_beams, constrained
        self.model_name, self.adapter = loaded.name, loaded.adapter
        self._trie: Any = None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "adapter": self.adapter, "weights": self.weights_id(),
                "num_beams": self.num_beams, "constrained": self.constrained}

    def run_settings(self) -> dict[str, Any]:
        # model, adapter and weights are bvip predict's own keys; the numerics (fp32 on the CPU, bf16 on a
        # GPU) change the text too, so a resume on another device or dtype starts a new run
        model = self.loaded.model
        return {"device": model.device.type, "dtype": str(model.dtype).removeprefix("torch.")}

    def weights_id(self) -> str | None:
        from bvip_helpers.predict import weights_id

        return weights_id(self.loaded)

    def caption(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int) -> list[CaptionResult]:
        # predict._generate_batch stays the one place local generation happens (the crash tests patch it there).
        from bvip_helpers import predict
        from bvip_helpers.constrained import mandatory_trie

        if self.constrained and self._trie is None:
            self._trie = mandatory_trie(self.loaded.processor)
        texts = predict._generate_batch(self.loaded, list(images), list(prompts), max_new_tokens=max_new_tokens,
                                        num_beams=self.num_beams, trie=self._trie)
        return [CaptionResult(text) for text in texts]

    def close(self) -> None:
        from bvip_helpers.predict import release

        release(self.loaded)


# --- Served models --------------------------------------------------------------------


def encode_image(image: Any, image_format: str = "png") -> tuple[str, str]:
    """``(mime type, base64)`` of a PIL image. PNG is lossless, so the server decodes the very pixels the
    local path sees; JPEG (quality 95) is smaller, for hosted APIs with upload limits."""
    formats = {"png": ("PNG", "image/png", {}), "jpeg": ("JPEG", "image/jpeg", {"quality": 95})}
    if image_format not in formats:
        raise ValueError(f"image format {image_format!r}: choose png or jpeg")
    pil_format, mime, options = formats[image_format]
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=pil_format, **options)
    return mime, base64.b64encode(buffer.getvalue()).decode("ascii")


def public_url(url: str) -> str:
    """``url`` without user name, password or query: what may be printed and written."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _folder_weights(source: str) -> str | None:
    """:func:`bvip_helpers.predict.weights_id` of a model folder that is not loaded here (None for a hub id)."""
    from types import SimpleNamespace

    from bvip_helpers.predict import weights_id

    return weights_id(SimpleNamespace(adapter=None, spec=SimpleNamespace(hub_id=source)))


class _RequestFailed(Exception):
    """One request that failed: the HTTP status (``None`` when no answer came), what was said, the tries made."""

    def __init__(self, status: int | None, detail: str, tries: int):
        super().__init__(detail)
        self.status, self.detail, self.tries = status, detail, tries

    def __str__(self) -> str:
        what = f"HTTP {self.status}: {self.detail}" if self.status else self.detail
        return what + (f" (after {self.tries} tries)" if self.tries > 1 else "")


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI ``{"error": {"message"}}``, Ollama ``{"error"}``, FastAPI ``{"detail"}``."""
    try:
        raw = err.read().decode("utf-8", errors="replace")
    except OSError:
        raw = ""
    try:
        body = json.loads(raw)
        message = body.get("error") or body.get("detail") or body
        if isinstance(message, dict):
            message = message.get("message") or message
        raw = message if isinstance(message, str) else json.dumps(message)
    except (ValueError, AttributeError):
        pass
    return " ".join((raw or err.reason or "").split())[:300]


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return float(err.headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None


class ServedBackend(Backend):
    """What the ``openai`` and ``ollama`` backends share: requests in threads, retries, the schema check.

    ``retries`` more tries after the first, waiting ``backoff * 2**n`` seconds (or the server's
    ``Retry-After``, at most ``max_backoff``). ``on_schema_failure="retry"`` asks again up to
    ``schema_retries`` times for a caption that fails the schema (useful with sampling: greedy decoding
    answers the same); ``"mark"`` keeps it with ``schema_ok: false``.
    """

    path = ""
    base_url_env = ""
    default_base_url = ""

    def __init__(self, model: str, *, base_url: str | None = None, concurrency: int = 4, timeout: float = 120.0,
                 retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, temperature: float = 0.0,
                 seed: int | None = None, structured_output: str = "none", on_schema_failure: str = "mark",
                 schema_retries: int = 1, image_format: str = "png"):
        if not model:
            raise ValueError(f"the {self.name} backend needs a model name (--model)")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, retries >= 0 and timeout > 0")
        if structured_output not in structured.DIALECTS:
            raise ValueError(f"structured output {structured_output!r}: choose one of {', '.join(structured.DIALECTS)}")
        if on_schema_failure not in SCHEMA_FAILURE_CHOICES:
            raise ValueError(f"on_schema_failure {on_schema_failure!r}: choose mark or retry")
        encode_image(_one_pixel(), image_format)  # fail on a bad format now, not per image
        self.model_name = model
        self.base_url = (base_url or os.environ.get(self.base_url_env) or self.default_base_url).rstrip("/")
        if urllib.parse.urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base URL {public_url(self.base_url)!r} must start with http:// or https://")
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.seed = float(temperature), seed
        self.structured, self.on_schema_failure, self.schema_retries = structured_output, on_schema_failure, schema_retries
        self.image_format = image_format
        self.do_sample = self.temperature > 0
        # A loopback server is never reached through a proxy the environment names for the outside world.
        self._opener = urllib.request.build_opener(
            *([urllib.request.ProxyHandler({})] if _is_loopback(self.base_url) else []))
        self._reached = False  # has any request of this backend succeeded?

    # What each server defines.
    def _headers(self) -> dict[str, str]:
        return {}

    def _body(self, mime: str, data: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def _content(self, answer: Any) -> tuple[str, str | None]:
        """``(the answer's text, why the server stopped: "stop", "length" or None)``."""
        raise NotImplementedError

    def _redact(self, text: str) -> str:
        return text

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def settings(self) -> dict[str, Any]:
        # The URL is not part of it: the same model answers the same from a restarted server on another port.
        return {"name": self.name, "model": self.model_name, "temperature": self.temperature, "seed": self.seed,
                "structured": self.structured, "on_schema_failure": self.on_schema_failure,
                "image_format": self.image_format}

    def run_settings(self) -> dict[str, Any]:
        return {"backend": self.settings(), "server": public_url(self.base_url)}

    def weights_id(self) -> str | None:
        """The weight files' stamps when the server serves a folder of this machine by its path (``transformers
        serve``), so retrained weights never resume old captions; ``None`` for a name only the server knows."""
        return _folder_weights(self.model_name) if os.path.isdir(self.model_name) else None

    # --- Requests -------------------------------------------------------------

    def _post(self, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self._headers()}
        failure: _RequestFailed | None = None
        for attempt in range(self.retries + 1):
            wait = min(self.backoff * 2**attempt, self.max_backoff)
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                failure = _RequestFailed(err.code, self._redact(_error_detail(err)), attempt + 1)
                if not retryable(err.code):
                    raise failure from None
                wait = min(_retry_after(err) or wait, self.max_backoff)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # refused, reset, timed out
                reason = getattr(err, "reason", None) or err
                failure = _RequestFailed(None, self._redact(f"{type(reason).__name__}: {reason}".rstrip(": ")), attempt + 1)
            else:
                try:
                    return json.loads(raw.decode("utf-8"))
                except ValueError as err:
                    raise _RequestFailed(200, f"the answer is not JSON ({err})", attempt + 1) from None
            if attempt < self.retries:
                time.sleep(wait)
        assert failure is not None
        raise failure

    def _explain(self, failure: _RequestFailed) -> str:
        """One line saying why nothing can be captioned, and what to change."""
        where = public_url(self.url)
        if failure.status is None:
            return (f"cannot reach {where}: {failure}. Check --base_url (or ${self.base_url_env}) and that the "
                    "server is running")
        if failure.status in (401, 403):
            return f"{where} refused the request ({failure}): check the API key{self._key_hint()}"
        if failure.status == 404:
            return (f"{where} answered {failure}: check --base_url (or ${self.base_url_env}) and that "
                    f"--model {self.model_name!r} is what the server serves")
        if failure.status in (400, 422) and self.structured != "none":
            return (f"{where} refused the request ({failure}); a server that does not take the "
                    f"{self.structured!r} structured output refuses it: pass that server's own dialect, or "
                    "--structured none (every caption is still checked against the schema here)")
        return f"{where} refused the first request ({failure}); check --model and the server's log"

    def _key_hint(self) -> str:
        return ""

    def _to_caption(self, content: str) -> tuple[str, list[str], dict[str, Any]]:
        """``(text, schema problems, extra keys)`` of one answer."""
        if self.structured in structured.JSON_DIALECTS:
            answer, problems = structured.parse_json_answer(content)
            if answer is None:
                return content.strip(), problems, {"text_raw": content}
            text = structured.caption_from_json(answer)
            return text, structured.check_caption(text), {"text_raw": content}
        text = content.strip()
        return text, structured.check_caption(text), {}

    def _caption_one(self, image: Any, prompt: str, max_new_tokens: int, *, first: bool = False) -> CaptionResult:
        mime, data = encode_image(image, self.image_format)
        body = self._body(mime, data, prompt, max_new_tokens)
        asks = 1 + (self.schema_retries if self.on_schema_failure == "retry" else 0)
        for ask in range(asks):
            try:
                content, stopped = self._content(self._post(body))
            except _RequestFailed as failure:
                # Until one request has worked, a failure says the server, key or URL is wrong: stop the run.
                if first or failure.status in FATAL_STATUS:
                    raise BackendError(self._explain(failure)) from None
                return CaptionResult(None, error=str(failure))
            self._reached = True
            if not content.strip():  # nothing to caption with: not written, so the next run asks again
                return CaptionResult(None, error=f"the server answered with no text (finish_reason {stopped!r})")
            text, problems, extra = self._to_caption(content)
            if stopped is not None:
                extra["finish_reason"] = stopped  # "length": cut off at --max_new_tokens
            if not problems or ask == asks - 1:
                break
        extra["schema_ok"] = not problems
        if problems:
            extra["schema_errors"] = problems
        return CaptionResult(text, extra=extra)

    def caption(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int) -> list[CaptionResult]:
        """Caption ``images`` with up to ``concurrency`` requests in flight; results in the order of ``images``."""
        results: list[CaptionResult | None] = [None] * len(images)
        todo = list(range(len(images)))
        if todo and not self._reached:  # the first request alone: a wrong URL or key fails once, not per image
            results[0] = self._caption_one(images[0], prompts[0], max_new_tokens, first=True)
            todo = todo[1:]
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"bvip-{self.name}")
        futures = {pool.submit(self._caption_one, images[i], prompts[i], max_new_tokens): i for i in todo}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
        except BaseException:  # a fatal answer or Ctrl-C: send nothing more, do not wait for the requests in flight
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return [r for r in results if r is not None]


def _one_pixel() -> Any:
    from PIL import Image

    return Image.new("RGB", (1, 1))


class OpenAIBackend(ServedBackend):
    """Any OpenAI-compatible ``/chat/completions`` server; images as base64 data URLs.

    ``base_url`` (ending in ``/v1``) defaults to ``$OPENAI_BASE_URL``, then ``http://127.0.0.1:8000/v1`` (where
    ``vllm serve`` and ``transformers serve`` listen); ``model`` to ``$OPENAI_MODEL``; ``api_key`` to the
    environment variable ``api_key_env`` (``OPENAI_API_KEY``). Local servers need no key.
    """

    name = "openai"
    path = "/chat/completions"
    base_url_env = "OPENAI_BASE_URL"
    default_base_url = "http://127.0.0.1:8000/v1"

    def __init__(self, model: str | None = None, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 **kwargs: Any):
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        super().__init__(model or os.environ.get("OPENAI_MODEL", ""), **kwargs)

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend(model={self.model_name!r}, base_url={public_url(self.base_url)!r})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _key_hint(self) -> str:
        where = "it is not set" if not self._api_key else "the one given was refused"
        return f" in ${self.api_key_env} ({where})"

    def _body(self, mime: str, data: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
                {"type": "text", "text": prompt}]}],
            "max_tokens": max_new_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return {**body, **structured.request_fields(self.structured)}

    def _content(self, answer: Any) -> tuple[str, str | None]:
        try:
            choice = answer["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _RequestFailed(200, f"no choices[0].message.content in the answer: {str(answer)[:200]}", 1) from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else "", choice.get("finish_reason")


class OllamaBackend(ServedBackend):
    """Ollama's native ``/api/chat``: the image as raw base64 (no data-URL prefix), ``format`` for the schema.

    ``base_url`` defaults to ``$OLLAMA_HOST``, then ``http://127.0.0.1:11434``. Ollama takes one
    structured-output dialect, a JSON schema (``--structured json-schema``).
    """

    name = "ollama"
    path = "/api/chat"
    base_url_env = "OLLAMA_HOST"
    default_base_url = "http://127.0.0.1:11434"

    def __init__(self, model: str, **kwargs: Any):
        if kwargs.get("structured_output", "none") not in ("none", "json-schema"):
            raise ValueError("the ollama backend takes --structured none or json-schema (Ollama's 'format')")
        host = kwargs.pop("base_url", None) or os.environ.get(self.base_url_env) or self.default_base_url
        if "://" not in host:  # OLLAMA_HOST is often written as host:port
            host = f"http://{host}"
        super().__init__(model, base_url=host, **kwargs)

    def _body(self, mime: str, data: str, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": self.temperature, "num_predict": max_new_tokens}
        if self.seed is not None:
            options["seed"] = self.seed
        body: dict[str, Any] = {"model": self.model_name, "stream": False, "options": options,
                                "messages": [{"role": "user", "content": prompt, "images": [data]}]}
        if self.structured == "json-schema":
            body["format"] = structured.CAPTION_JSON_SCHEMA
        return body

    def _content(self, answer: Any) -> tuple[str, str | None]:
        try:
            content = answer["message"]["content"]
        except (KeyError, TypeError):
            raise _RequestFailed(200, f"no message.content in the answer: {str(answer)[:200]}", 1) from None
        return content if isinstance(content, str) else "", answer.get("done_reason")


# --- CLIP-Interrogator ----------------------------------------------------------------

SIDES = schema.OBJECT_POSITIONS
#: The phrases CLIP ranks, per list: the best sidewalk and road phrase, then the ``top_k`` best objects.
BVIP_VOCABULARY: dict[str, tuple[str, ...]] = {
    "sidewalk": tuple(f"the sidewalk on the {side}" for side in SIDES),
    "road": (*(f"the road on the {side}" for side in SIDES), "the road crossing in front"),
    "objects": tuple(f"{'an' if o.name[0] in 'aeiou' else 'a'} {o.name} on the {side}"
                     for o in schema.OBJECT_CLASSES for side in SIDES),
}
#: CLIP-Interrogator's own pair: the BLIP caption model and CLIP ViT-L/14 (registry ``blip-large`` and
#: ``clip-interrogator``).
CLIP_INTERROGATOR_CAPTIONER = "blip-large"
CLIP_INTERROGATOR_CLIP = "clip-interrogator"


class ClipInterrogatorBackend(Backend):
    """CLIP-Interrogator's method on transformers' classes: a BLIP caption (:class:`TransformersBackend` over
    ``BlipForConditionalGeneration``), then, ranked by CLIP (``CLIPModel``) image-text similarity, the best
    sidewalk and road phrase and the ``top_k`` best object phrases of :data:`BVIP_VOCABULARY`, joined as
    ``caption, phrase, phrase, ...``.
    """

    name = "clip-interrogator"

    def __init__(self, clip: str = CLIP_INTERROGATOR_CLIP, captioner: Any = CLIP_INTERROGATOR_CAPTIONER, *,
                 top_k: int = 3):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from bvip_helpers.io import resolve
        from bvip_helpers.registry import MODELS, model_source

        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        self.top_k = top_k
        source = model_source(MODELS[clip]) if clip in MODELS else str(resolve(clip)) if resolve(clip).is_dir() else clip
        self.clip_source = source
        self.clip = CLIPModel.from_pretrained(source, use_safetensors=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.image_processor = AutoImageProcessor.from_pretrained(source)
        self.captioner = captioner if isinstance(captioner, Backend) else as_backend(captioner)
        self.model_name = f"{self.captioner.model_name}+{clip}"
        self._torch = torch
        self._phrase_features = {kind: self._text_features(list(phrases)) for kind, phrases in BVIP_VOCABULARY.items()}

    @staticmethod
    def _unit(features: Any) -> Any:
        features = getattr(features, "pooler_output", features)  # transformers 5 returns the pooled output object
        return features / features.norm(dim=-1, keepdim=True)

    def _text_features(self, phrases: list[str]) -> Any:
        tokens = self.tokenizer(phrases, padding=True, return_tensors="pt")
        with self._torch.no_grad():
            return self._unit(self.clip.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"]))

    def rank(self, images: Sequence[Any]) -> list[dict[str, list[tuple[str, float]]]]:
        """Per image, each vocabulary list's phrases with their CLIP similarity, best first."""
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with self._torch.no_grad():
            image_features = self._unit(self.clip.get_image_features(pixel_values=pixels.to(self.clip.dtype)))
        ranked: list[dict[str, list[tuple[str, float]]]] = [{} for _ in images]
        for kind, features in self._phrase_features.items():
            similarity = (image_features @ features.T).tolist()
            for i, row in enumerate(similarity):
                ranked[i][kind] = sorted(zip(BVIP_VOCABULARY[kind], row, strict=True), key=lambda p: -p[1])
        return ranked

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "clip": self.clip_source, "captioner": self.captioner.settings(),
                "top_k": self.top_k, "vocabulary": BVIP_VOCABULARY}

    def weights_id(self) -> str | None:
        return "|".join(filter(None, (self.captioner.weights_id(), _folder_weights(self.clip_source)))) or None

    def caption(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int) -> list[CaptionResult]:
        captions = self.captioner.caption(images, prompts, max_new_tokens=max_new_tokens)
        results = []
        for result, ranked in zip(captions, self.rank(images), strict=True):
            if not result.ok:
                results.append(result)
                continue
            phrases = [ranked["sidewalk"][0][0], ranked["road"][0][0], *(p for p, _ in ranked["objects"][: self.top_k])]
            results.append(CaptionResult(", ".join([result.text.rstrip(". "), *phrases]) if result.text else
                                         ", ".join(phrases)))
        return results

    def close(self) -> None:
        self.captioner.close()
        self.clip = None


# --- Building backends ------------------------------------------------------------------


def as_backend(model: Any, adapter: Any = None, *, num_beams: int = 1, constrained: bool = False,
               device: str = "auto", dtype: str = "auto") -> Backend:
    """A :class:`Backend` for ``model``: a backend as it is, a loaded model, or anything
    :func:`bvip_helpers.predict.load` accepts (loaded with ``adapter`` on ``device`` in ``dtype``) on the
    local ``transformers`` path."""
    from bvip_helpers.predict import LoadedModel, load

    if isinstance(model, Backend):
        if not isinstance(model, TransformersBackend) and (num_beams != 1 or constrained):
            raise ValueError(f"num_beams and --constrained belong to local decoding; the {model.name} backend "
                             "decodes as its server does (ask a server for the schema with --structured)")
        return model
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load(model, adapter, device=device, dtype=dtype)
        print(f"predict: {loaded.name} on {loaded.model.device}, {loaded.model.dtype}", file=sys.stderr)
    return TransformersBackend(loaded, num_beams=num_beams, constrained=constrained)


def parse_chain(text: str) -> list[tuple[str, str, str | None]]:
    """``--chain "transformers:MODEL,openai:MODEL@URL,..."`` -> ``[(backend, model, base_url or None), ...]``.

    The first ``:`` splits the backend from the model (Ollama names such as ``llava:7b`` keep theirs); an
    optional ``@URL`` gives that step its own server.
    """
    steps = []
    for number, item in enumerate((part.strip() for part in text.split(",") if part.strip()), start=1):
        backend, sep, model = item.partition(":")
        if not sep or backend not in BACKENDS or backend == "chain" or not model:
            raise ValueError(f"--chain step {number} {item!r}: write BACKEND:MODEL[@URL] with BACKEND one of "
                             f"{', '.join(b for b in BACKENDS if b != 'chain')}")
        model, _, url = model.partition("@") if "://" in model else (model, "", "")
        steps.append((backend, model, url or None))
    if len(steps) < 2:
        raise ValueError(f"--chain {text!r}: a chain needs at least two steps, comma-separated")
    return steps


def _registry_served(backend: str, model: str | None, served: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A registry name (``gpt-4o``, ``llava-7b``) becomes the server's model id and, unless ``--base_url`` says
    otherwise, the entry's endpoint."""
    from bvip_helpers.registry import MODELS

    spec = MODELS.get(model or "")
    if spec is None:
        return model, served
    if spec.backend != backend:
        raise ValueError(f"{model} runs through --backend {spec.backend}, not {backend}")
    return spec.hub_id, {**served, "base_url": served.get("base_url") or spec.endpoint}


def _chain_step_served(kind: str, url: str | None, served: dict[str, Any]) -> dict[str, Any]:
    """A chain step's server settings: its own ``@URL``, else ``--base_url`` for an ``openai`` step only (an
    Ollama step without ``@URL`` reads ``$OLLAMA_HOST``: one shared URL cannot be both servers)."""
    step = {k: v for k, v in served.items() if k != "base_url" or kind == "openai"}
    return {**step, "base_url": url} if url else step


def make_backend(backend: str, model: str | None, *, adapter: Any = None, num_beams: int = 1,
                 constrained: bool = False, chain: str | None = None, captioner: str = CLIP_INTERROGATOR_CAPTIONER,
                 top_k: int = 3, refine_prompt: str | None = None, **served: Any) -> Backend:
    """The backend ``bvip predict --backend`` names; ``served`` holds the keyword arguments of
    :class:`ServedBackend` (and ``api_key_env`` for ``openai``)."""
    if backend == "transformers":
        if not model:
            raise ValueError("the transformers backend needs --model")
        return as_backend(model, adapter, num_beams=num_beams, constrained=constrained)
    if adapter or num_beams != 1 or constrained:
        raise ValueError(f"--adapter, --num_beams and --constrained belong to the transformers backend, not {backend}")
    if backend in ("openai", "ollama"):
        model, served = _registry_served(backend, model, served)
        if backend == "openai":
            return OpenAIBackend(model, **served)
        served.pop("api_key_env", None)
        return OllamaBackend(model or "", **served)
    if backend == "clip-interrogator":
        return ClipInterrogatorBackend(model or CLIP_INTERROGATOR_CLIP, captioner, top_k=top_k)
    if backend == "chain":
        from bvip_helpers.chain import REFINE_PROMPT, ChainBackend

        if not chain:
            raise ValueError("--backend chain needs --chain BACKEND:MODEL,BACKEND:MODEL[,...]")
        steps = [make_backend(kind, step_model, captioner=captioner, top_k=top_k, **_chain_step_served(kind, url, served))
                 for kind, step_model, url in parse_chain(chain)]
        return ChainBackend(steps, refine_prompt or REFINE_PROMPT)
    raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


# --- A local server -----------------------------------------------------------------------


class LocalServer:
    """``transformers serve MODEL`` (transformers' own OpenAI-compatible server) on a free 127.0.0.1 port.

    For the tests, the benchmark and a first try of the ``openai`` backend without vLLM: the model is pinned
    by its path, nothing is fetched (``HF_HUB_OFFLINE=1``), and the process is stopped by its PID::

        with LocalServer("models/tiny-qwen2-vl-base") as server:
            backend = OpenAIBackend(server.model, base_url=server.base_url)

    Needs ``pip install 'bvip-helpers[serve]'`` (fastapi, uvicorn, openai).
    """

    def __init__(self, model: str | os.PathLike[str], *, port: int | None = None, device: str = "cpu",
                 threads: int | None = 1, startup_timeout: float = 180.0, log_path: str | os.PathLike[str] | None = None):
        from bvip_helpers.io import resolve

        self.model = str(resolve(model))
        self.port, self.device, self.threads = port, device, threads
        self.startup_timeout, self.log_path = startup_timeout, log_path
        self.process: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @staticmethod
    def free_port() -> int:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def start(self) -> LocalServer:
        import subprocess
        import sys
        import tempfile

        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            raise RuntimeError("transformers serve needs fastapi, uvicorn and openai: pip install 'bvip-helpers[serve]'")
        self.port = self.port or self.free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self._log = open(self.log_path, "wb") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", self.device, "--log-level", "warning"]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"transformers serve was not ready after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, connections dropped mid-answer."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit within 15 s."""
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._log.close()
