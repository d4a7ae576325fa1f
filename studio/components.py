"""The input components the app uses in place of Gradio's own, and the guards around its endpoints.

Input components are same-named subclasses of Gradio's whose ``preprocess`` never raises: a value
Gradio would refuse (a choice not in the list, a slider out of range, an unreadable or oversized
image) arrives at the endpoint as ``Refused`` and the endpoint answers it with a clean message, so
the server log gets no traceback. Images are held to the pixel limit from their headers before
anything decodes them (sketch pad and scribble editor layers included); the seed arrives unrounded,
so 1.5 is refused rather than taken as 2.
"""
from __future__ import annotations

import base64
import functools
import io
import re
import threading
from abc import ABCMeta
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr
import pydantic
from gradio.components.base import server
from gradio.components.image_editor import EditorData as _EditorData
from gradio.data_classes import ImageData as _ImageData
from gradio.templates import Sketchpad as _Sketchpad
from PIL import Image

from ilvr.images import MAX_PIXELS, ImageError

from .inputs import check_pixels
from .jobs import ActiveRuns

MAX_BLOB_BYTES = 25 * 2 ** 20


def user_error(message: str, title: str) -> gr.Error:
    """An expected mistake of the user's: shown in the page, not logged with a traceback."""
    return gr.Error(message, title=title, print_exception=False)


# ----------------------------------------------------------------------------- input components
@dataclass(frozen=True)
class Refused:
    """What an input component passes on in place of a value it could not take."""

    message: str
    title: str = "Check the inputs"

    def __bool__(self) -> bool:  # the private events' `if value` treat it as something the user gave
        return True


def refused(*values: Any) -> None:
    """Raise the first Refused among an endpoint's arguments as a user error."""
    for value in values:
        if isinstance(value, Refused):
            raise user_error(value.message, value.title)


def _image_refusal(e: Exception) -> Refused:
    """Too large, or not an image: said without echoing the server's file names."""
    text = str(e)
    if "megapixels" in text or isinstance(e, Image.DecompressionBombError):
        return Refused(f"The uploaded image is larger than {MAX_PIXELS // 1_000_000} megapixels. Shrink it first: "
                       "it is resized to the model's resolution anyway.", "Image too large")
    kind = re.search(r"\((\w+)\)$", text) if isinstance(e, ImageError) else None
    return Refused(f"The uploaded file is not an image this app can read ({kind.group(1) if kind else type(e).__name__}"
                   "). Use a PNG, JPEG or WebP.", "Unreadable image")


def _source_of(data: Any) -> Any:
    """What check_pixels reads for one image of a payload: a file path, bytes (an editor blob or a
    data: URL), or None."""
    if data is None or isinstance(data, (bytes, bytearray, memoryview)):
        return data
    url = getattr(data, "url", None) or ""
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[-1])
    return getattr(data, "path", None)


def _checked(data: Any) -> Any:
    """One editor image after its header check: a file path, or a lazily opened image (nothing decoded)."""
    source = _source_of(data)
    if source is None:
        return None
    check_pixels(source)
    return source if isinstance(source, str) else Image.open(io.BytesIO(source))


class BlobStore:
    """The editors' uploaded canvases (Gradio keeps them per component, unbounded, and grows a layer list
    to any index a client names): at most max_bytes and max_entries, oldest dropped first. A run takes
    its entry out (``take``); a preprocess only reads it, since a validator preprocesses too."""

    def __init__(self, max_bytes: int = 64 * 2 ** 20, max_entries: int = 512, max_layers: int = 4):
        self.max_bytes, self.max_entries, self.max_layers = max_bytes, max_entries, max_layers
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def _size(self, entry: dict) -> int:
        return sum(len(b) for b in (entry["background"], entry["composite"], *entry["layers"]) if b)

    def put(self, key: str, kind: str, index: int | None, blob: bytes) -> None:
        if kind not in ("background", "composite", "layer") or len(blob) > MAX_BLOB_BYTES:
            return
        if kind == "layer" and not (index is not None and 0 <= index < self.max_layers):
            return
        with self._lock:
            entry = self._entries.pop(key, None) or {"background": None, "composite": None, "layers": []}
            if kind == "layer":
                entry["layers"] += [None] * (index + 1 - len(entry["layers"]))
                entry["layers"][index] = blob
            else:
                entry[kind] = blob
            self._entries[key] = entry
            total = sum(self._size(e) for e in self._entries.values())
            while self._entries and (total > self.max_bytes or len(self._entries) > self.max_entries):
                total -= self._size(self._entries.popitem(last=False)[1])

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._entries.get(key)

    def take(self, key: str | None) -> None:
        with self._lock:
            self._entries.pop(key or "", None)

    def __len__(self) -> int:
        return len(self._entries)


BLOBS = BlobStore()


def _editor_preprocess(self, payload):
    """The editor's value as {background, layers, composite, id}: file paths (or lazily opened blobs),
    each checked from its header; Refused when one is over the pixel limit or not an image."""
    if payload is None:
        return None
    parts = {"background": payload.background, "layers": list(payload.layers or []), "composite": payload.composite}
    if payload.id is not None:
        parts = BLOBS.get(payload.id) or parts
    try:
        return {"background": _checked(parts["background"]), "composite": _checked(parts["composite"]),
                "layers": [x for x in (_checked(layer) for layer in parts["layers"]) if x is not None],
                "id": payload.id}
    except (ImageError, ValueError, OSError) as e:
        return _image_refusal(e)


def accept_blobs(self, data):
    """The editor's upload of its canvas (a Gradio server function, named as Gradio's: the page calls
    it by name), into the bounded BLOBS."""
    body = getattr(data, "data", None)
    files = getattr(data, "files", None)
    if not isinstance(body, dict) or not files:
        return
    try:
        index = int(body["index"]) if body.get("index") not in (None, "", "null") else None
        BLOBS.put(str(body["id"]), str(body["type"]), index, bytes(files[0][1]))
    except (KeyError, ValueError, TypeError, IndexError):
        return


def _quiet_preprocess(original: Callable) -> Callable:
    def preprocess(self, payload):
        try:
            return original(self, payload)
        except gr.Error as e:
            return Refused(str(e.message), e.title or "Check the inputs")
        except Exception as e:  # noqa: BLE001 - any value an API client sends
            return Refused(f"{self.label or 'A value'} could not be read ({type(e).__name__}).")
    return preprocess


def _lenient(model: type) -> type:
    """A component's data model (same name, same schema) that reads a payload it cannot validate (a
    string where a file was expected) as an empty value: Gradio validates it before preprocess, and
    its ValidationError would reach the log as a traceback."""
    def or_empty(cls, value, handler):
        try:
            return handler(value)
        except pydantic.ValidationError:
            return handler({})
    validator = pydantic.model_validator(mode="wrap")(classmethod(or_empty))
    return type(model.__name__, (model,), {"__module__": model.__module__, "lenient_payload": validator})


def _image_preprocess(self, payload):
    if payload is not None:
        try:
            source = _source_of(payload)
            if source is None:
                return Refused("The image is not an uploaded file (gradio_client: handle_file(path)).")
            check_pixels(source)
        except (ImageError, ValueError, OSError) as e:
            return _image_refusal(e)
    try:
        return gr.Image.preprocess(self, payload)
    except gr.Error as e:
        return Refused(str(e.message), e.title or "Unreadable image")
    except Exception as e:  # noqa: BLE001
        return _image_refusal(e)


def _seed_preprocess(self, payload):
    """The typed number as sent (Gradio's precision=0 would round 1.5 to 2): the endpoint checks it."""
    return payload


def _guarded(base: type, **methods: Any) -> type:
    """A subclass of a Gradio component with the same name (so the page draws it the same) and these
    methods. A subclass, not a patched instance: Gradio re-creates a component in the session
    (``block.__class__(**args)``) when an event updates it (an example click, a visibility change),
    and a patched instance would lose its patch there. Made with ABCMeta.__new__, skipping
    ComponentMeta.__new__, which writes a .pyi stub next to any module that subclasses a component."""
    name = base.__base__.__name__.lower() if getattr(base, "is_template", False) else base.__name__.lower()
    attrs = {"__module__": __name__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
             "get_block_name": lambda self: name, "get_block_class": lambda self: name, **methods}
    return ABCMeta.__new__(type(base), base.__name__, (base,), attrs)


Dropdown, Radio, Slider, Checkbox, Textbox = (_guarded(c, preprocess=_quiet_preprocess(c.preprocess))
                                              for c in (gr.Dropdown, gr.Radio, gr.Slider, gr.Checkbox, gr.Textbox))
ImageUpload = _guarded(gr.Image, preprocess=_image_preprocess, data_model=_lenient(_ImageData))
_EDITOR = dict(preprocess=_editor_preprocess, accept_blobs=server(accept_blobs), data_model=_lenient(_EditorData))
ImageEditor = _guarded(gr.ImageEditor, **_EDITOR)
Sketchpad = _guarded(_Sketchpad, **_EDITOR)
Seed = _guarded(gr.Number, preprocess=_seed_preprocess)


# ----------------------------------------------------------------------------- endpoints
def endpoint(running: ActiveRuns) -> Callable:
    """Decorates a sampling endpoint: refuses what an input component could not take (Refused) before
    any work, counts the session's run in `running` while it lasts, and drops the editors' canvases
    afterwards."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)  # Gradio reads the wrapped signature (gr.Request, gr.Progress, API names)
        def run(*args, **kwargs):
            values = args + tuple(kwargs.values())
            request = next((v for v in values if isinstance(v, gr.Request)), None)
            session = getattr(request, "session_hash", None)
            running.start(session)
            try:
                refused(*values)
                yield from fn(*args, **kwargs)
            finally:
                running.finish(session)
                for v in values:
                    if isinstance(v, dict) and "id" in v:
                        BLOBS.take(v["id"])
        return run
    return decorate


def one_run_per_session(demo: gr.Blocks, endpoint_fn: Callable, running: ActiveRuns) -> Callable:
    """A validator for a sampling event (Gradio runs it when a run is queued, before it waits): a
    session with a run running (`running`) or waiting in the sampling queue is refused a second place
    in the queue. Refused by raising: the page shows that as an error toast (a validation message
    would flash for a moment beside an input while the first run streams); gradio_client callers get
    HTTP 400 from /queue/join, and the server log one line."""
    @functools.wraps(endpoint_fn)
    def validate(*args, **kwargs):
        values = args + tuple(kwargs.values())
        request = next((v for v in values if isinstance(v, gr.Request)), None)
        session = getattr(request, "session_hash", None)
        queues = getattr(getattr(demo, "_queue", None), "event_queue_per_concurrency_id", None) or {}
        waiting = getattr(queues.get("sampling"), "queue", None) or []
        if running.busy(session) or any(getattr(e, "session_hash", None) == session for e in waiting):
            raise user_error("You already have a run queued or running: wait for it to finish, or press Cancel. "
                             "This server takes one run per visitor at a time.", "One run at a time")
        return [gr.validate(True, "") for v in values if not isinstance(v, (gr.Request, gr.Progress))]
    return validate

def install_pixel_limit() -> None:
    """Pillow refuses, from the header, any image over the app's pixel limit everywhere in this process
    (Gradio's own decoding included): its error starts at twice MAX_IMAGE_PIXELS."""
    import warnings

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
