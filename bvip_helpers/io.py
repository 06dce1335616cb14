"""Files in and out: repo paths, atomic writes, JSONL with line numbers, safe image loading.

Every stage writes through these helpers so that a crash never leaves a half-written
file behind and every bad input is reported with its file and line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

#: The two CSVs of the SENSATION format, as the data set ships them (and ``bvip synth`` writes them).
CAPTIONS_FILE = "complete_captions_sensation.csv"
ANNOTATIONS_FILE = "annotations_with_obj_pos.csv"


def repo_root() -> Path:
    """The repository root: the nearest parent holding ``pyproject.toml`` and ``notebooks/``.

    Notebooks run in their own folder under nbmake/papermill, so they resolve every
    path from here instead of the working directory. ``BVIP_ROOT`` overrides it.
    """
    if os.environ.get("BVIP_ROOT"):
        return Path(os.environ["BVIP_ROOT"]).resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for candidate in (start, *start.parents):
            if (candidate / "pyproject.toml").is_file() and (candidate / "notebooks").is_dir():
                return candidate
    return Path.cwd()


def resolve(path: str | os.PathLike[str]) -> Path:
    """A path relative to the repo root (absolute paths are kept)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def resolve_cli_path(path: str | os.PathLike[str]) -> Path:
    """A path given on the command line: relative to the current directory, as every Unix tool reads it.

    (Notebooks use :func:`resolve`: they run in ``notebooks/`` but name paths from the repository root.)
    """
    return Path(path).expanduser().absolute()


def figures_dir() -> Path:
    """``figures/`` under the repo root; ``BVIP_FIGURES_DIR`` redirects it (the tests do, to keep demo figures)."""
    out = Path(os.environ["BVIP_FIGURES_DIR"]) if os.environ.get("BVIP_FIGURES_DIR") else repo_root() / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_fig(name: str, fig: Any = None, *, tight: bool = True, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``figures/<name>.png`` (atomically) and return the path."""
    import matplotlib.pyplot as plt

    fig = fig or plt.gcf()
    if tight:
        fig.tight_layout()
    target = figures_dir() / f"{name}.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return target


class atomic_path:
    """Context manager yielding a temporary path that replaces ``target`` on success.

    >>> with atomic_path("out.csv") as tmp:
    ...     frame.to_csv(tmp)
    """

    def __init__(self, target: str | os.PathLike[str]):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            umask = os.umask(0)  # mkstemp creates 0600 files; give the result the usual permissions
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | os.PathLike[str],
               clear: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on success it replaces ``target``.

    A crash while writing (a model save, say) never leaves half a folder behind. ``clear(target)``
    removes the old folder first (default: delete it); pass a function that refuses to delete
    something it does not recognise.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    try:
        yield staging
        (clear or remove_tree)(target)
        os.replace(staging, target)
    finally:
        remove_tree(staging)


def remove_tree(path: Path) -> None:
    """Delete a folder or file if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def file_sha1(path: str | os.PathLike[str]) -> str | None:
    """Content hash of a data file (``None`` when it is missing): caches stamped with it are rebuilt when
    the file is redrawn."""
    import hashlib

    path = Path(path)
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically; returns the number written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def append_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so a killed run loses at most the batch in flight."""
    payload = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def os_error_line(err: OSError) -> str:
    """An ``OSError`` as one line: the path it names and the reason (never a multi-line hub message)."""
    lines = (err.strerror or str(err) or type(err).__name__).strip().splitlines() or [type(err).__name__]
    first = lines[0].rstrip(".")  # callers go on after it with their own sentence
    return f"{err.filename}: {first}" if err.filename else first


def concerns(err: OSError, output: str | os.PathLike[str] | None) -> bool:
    """Whether ``err`` is about ``output`` or something inside it (so "cannot write" is the right advice)."""
    if output is None or not err.filename:
        return False
    failed, target = Path(os.path.abspath(err.filename)), Path(os.path.abspath(output))
    beside = failed.parent == target.parent and target.name in failed.name  # its .lock, .tmp and .previous
    return failed == target or target in failed.parents or failed in target.parents or beside  # parents: its mkdir


class JsonlError(ValueError):
    """A malformed JSONL line; the message names the file and line number."""


def parse_json_object(line: str) -> dict[str, Any]:
    """One JSONL line as a dict; ``ValueError`` when it is not valid JSON or not an object."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def not_utf8_message(path: str | os.PathLike[str], line: int, byte: int, what: str = "file") -> str:
    """The one wording for text that is not UTF-8 (a Latin-1 export, say), naming the file, line and byte."""
    return (f"{path}: line {line} is not UTF-8 text (byte 0x{byte:02x}); the {what} must be UTF-8: "
            f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed_{Path(path).name}`")


def numbered_jsonl(path: str | os.PathLike[str], *, skip_bad_lines: bool = False,
                   bad_lines: list[int] | None = None,
                   skip_flag: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)``; a malformed line raises :class:`JsonlError` unless ``skip_bad_lines``.

    Line numbers count every line of the file (blank ones too), as an editor shows them, so
    later errors about a record can name its line. Skipped line numbers are appended to
    ``bad_lines``. A truncated last line (a run killed mid-write) is treated like any malformed line,
    and so is a line that is not UTF-8. ``skip_flag`` names the caller's flag that skips bad lines
    (``--skip_bad_lines``), so the error only suggests a flag the command has.
    """
    advice = f", or pass {skip_flag} to count and skip it" if skip_flag else ""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                if not skip_bad_lines:
                    raise JsonlError(not_utf8_message(path, number, raw[err.start], "JSONL file")) from None
                if bad_lines is not None:
                    bad_lines.append(number)
                continue
            if not line.strip():
                continue
            try:
                record = parse_json_object(line)
            except ValueError as err:
                if not skip_bad_lines:
                    raise JsonlError(f"{path}: line {number} is not a JSON object ({err}). "
                                     f"Fix or delete that line{advice}.") from err
                if bad_lines is not None:
                    bad_lines.append(number)
                continue
            yield number, record


def iter_jsonl(path: str | os.PathLike[str], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The records of :func:`numbered_jsonl`, without line numbers."""
    for _, record in numbered_jsonl(path, **kwargs):
        yield record


def read_jsonl(path: str | os.PathLike[str], **kwargs: Any) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, **kwargs))


class ImagePathError(ValueError):
    """An image path that escapes the image root, or an image that is missing, unreadable or too large."""


def check_image_root(image_root: str | os.PathLike[str]) -> Path:
    """``image_root`` as a path, or :class:`ImagePathError` when it is not a folder (a typo, an unmounted disk).

    Without this check every image would be reported missing, one by one, instead of the one root.
    """
    root = Path(image_root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ImagePathError(f"--image_root {root} {what}; pass the folder the image paths are relative to")
    return root


def safe_image_path(image_root: str | os.PathLike[str], relative: str) -> Path:
    """Join ``relative`` under ``image_root``, refusing paths that escape it (``../``, absolute)."""
    root = Path(image_root).resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise ImagePathError(
            f"image path {relative!r} escapes the image root {root}; "
            "image paths must be relative and stay inside --image_root"
        )
    return candidate


#: Images with more pixels than this are refused as bad images before they are decoded: a 14,000 x 14,000
#: "decompression bomb" of a few kilobytes would otherwise need gigabytes of memory. ``bvip predict
#: --max_image_pixels`` (and ``max_pixels`` below) set another limit; 50 MP is a 8,660 x 5,770 photo.
MAX_IMAGE_PIXELS = 50_000_000


@contextmanager
def _opened_image(path: str | os.PathLike[str], max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open`` with every failure as :class:`ImagePathError` and the pixel limit checked on the header."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if pillow_limit and limit > pillow_limit:  # Pillow's own guard would refuse what was allowed here
                Image.MAX_IMAGE_PIXELS = limit
            with Image.open(path) as img:
                width, height = img.size
                if width * height > limit:
                    raise ImagePathError(_too_large(path, f"{width} x {height} = {width * height:,}", limit))
                yield img
    except FileNotFoundError as err:
        raise ImagePathError(f"image not found: {path}") from err
    except Image.DecompressionBombError as err:
        raise ImagePathError(_too_large(path, f"more than {2 * max(limit, pillow_limit or 0):,}", limit)) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImagePathError(f"image unreadable or corrupt: {path} ({err})") from err
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _too_large(path: str | os.PathLike[str], size: str, limit: int) -> str:
    return (f"image too large: {path} has {size} pixels, over the limit of {limit:,} pixels (a decompression bomb "
            "guard); shrink the image, or raise the limit with --max_image_pixels")


def image_size(path: str | os.PathLike[str], max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only; :class:`ImagePathError` when missing, unreadable or too large."""
    with _opened_image(path, max_pixels) as img:
        return img.size


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open an image fully (so corruption shows here, not mid-batch) as RGB.

    Raises :class:`ImagePathError` when it is missing, unreadable, or has more than ``max_pixels``
    (default :data:`MAX_IMAGE_PIXELS`) pixels.
    """
    with _opened_image(path, max_pixels) as img:
        img.load()
        return img.convert("RGB")


def check_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> str | None:
    """``None`` when the image opens, else a one-line reason."""
    try:
        load_image(path, max_pixels)
    except ImagePathError as err:
        return str(err)
    return None


# --- one writer per output file ----------------------------------------------------


class OutputLockedError(ValueError):
    """Another process is writing the same output file."""


@contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``<target>.lock`` while writing ``target``; a second writer gets :class:`OutputLockedError`.

    The lock is an advisory ``flock`` on a lock file that names the holder (pid and host), so the kernel
    drops it when the holder dies, even by SIGKILL: a stale lock file never blocks a resume. Creating
    the lock file is also the first write, so an unwritable folder fails here, before any work.
    Without ``fcntl`` (Windows) there is no lock.
    """
    target = Path(target)
    lock_path = target.with_name(target.name + ".lock")
    try:
        import fcntl
    except ImportError:
        yield lock_path
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise OutputLockedError(f"{target} is being written by another process ({holder}; lock file "
                                    f"{lock_path}). Wait for it to finish, or write to another file.") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)  # while still locked, so no one locks a file that is going away
        os.close(fd)
