"""Images and documents in a prompt.

In a template, ``{{ image(x) }}`` and ``{{ document(x) }}`` put a picture or a document where they
stand, the text before and after keeping its order. ``x`` is bytes (a binary column, as
``spark.read.format("binaryFile")`` gives), a path (local, or ``/Volumes/...`` on Databricks), or a
PIL image. Nothing is fetched from a URL, and a path is read only as an image or a PDF: a file that
is neither is refused before anything is sent, so a column of paths cannot send another file.

A rendered prompt with attachments is a `Parts` (text and `Attachment` in order); the request
builder (`dbmagic.call.wire`) makes each kind's content parts of it: chat's ``image_url`` parts with
a ``data:`` URL, the Responses API's ``input_image``. Images are fitted for Databricks' 4 MB request
limit: downscaled to a long side of `MAX_SIDE` pixels and re-encoded (JPEG at `QUALITY`, PNG when the
picture has transparency), or sent as they are when they already fit. A document is sent as its pages'
images (``as_="images"``, the default: vision models read scans and layouts), as its text (``as_="text"``:
a PDF's text layer), or as the file itself (``as_="file"``: OpenAI's ``file`` part, for external models
that take it).

Pillow (images) and pypdfium2 (PDF pages and text) are imported only when an attachment is used:
``pip install 'dbmagic[documents]'``.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import io
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import AttachmentError, ConfigurationError

__all__ = ["Attachment", "Parts", "described_url", "AttachmentError", "image", "document", "collecting", "MAX_REQUEST_BYTES",
           "MAX_SIDE", "QUALITY", "MAX_PAGES", "IMAGE_KINDS"]

MAX_REQUEST_BYTES = 4_000_000  # Databricks' request limit for foundation, external and agent endpoints (4 MB)
MAX_SIDE = 1568  # pixels, the long side an image is brought down to (the size vision models read best)
QUALITY = 85  # JPEG quality of a re-encoded image
MAX_PAGES = 20  # pages of a document sent, unless pages= says otherwise
ORIENTATION = 0x0112  # the EXIF tag that says how a photo is turned (1: as stored)
MAX_FILE_BYTES = 100 << 20  # the largest file read (the AI Functions' own document limit is 100 MB)
MIN_SIDE = 256  # an image is not shrunk below this to make a request fit: the row fails instead
# an image sent as it is: what every vision model takes
SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png"}
# request kinds that take images (content parts); the others take text only
IMAGE_KINDS = ("chat", "responses")


@dataclass(frozen=True, eq=False)
class Attachment:
    """One picture or file as it will be sent: ``mime`` and the encoded ``data``; ``width`` and
    ``height`` for an image; ``source`` says where it came from (for messages)."""

    mime: str
    data: bytes
    source: str
    width: int = 0
    height: int = 0
    filename: str = ""

    @property
    def is_image(self) -> bool:
        return self.mime.startswith("image/")

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    @property
    def tokens(self) -> int:
        """About how many input tokens it costs: (width x height) / 750 for an image (Anthropic's rule
        of thumb, at most 1,600 once fitted), a page's worth for a file."""
        if self.is_image:
            return max(1, (self.width * self.height) // 750)
        return 1_600

    def describe(self) -> str:
        """``image/jpeg 800x600, 91 KB`` (what a summary or a dry run shows)."""
        size = f"{self.width}x{self.height}, " if self.is_image else ""
        return f"{self.mime} {size}{len(self.data) / 1000:,.0f} KB"

    def __repr__(self) -> str:
        return f"Attachment({self.describe()}, from {self.source})"


def described_url(url: str) -> str:
    """A ``data:`` URL as a dry run shows it: ``data:image/jpeg;base64,... (91 KB, 1568x1045, about
    3,276 input tokens)``."""
    head, _, data = url.partition(",")
    size = len(data) * 3 // 4
    shown = f"{head},... ({size / 1000:,.0f} KB"
    if head.startswith("data:image/"):
        try:
            Image = _pil()
            with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
                width, height = picture.size
            shown += f", {width}x{height}, about {max(1, width * height // 750):,} input tokens"
        except Exception:  # shown without its size
            pass
    return shown + ")"


class Parts(list):
    """A prompt with attachments: text (``str``) and `Attachment` items, in order."""

    def strip(self) -> Parts:
        """Leading whitespace of the first text and trailing of the last gone, as ``str.strip``."""
        items = list(self)
        if items and isinstance(items[0], str):
            items[0] = items[0].lstrip()
        if items and isinstance(items[-1], str):
            items[-1] = items[-1].rstrip()
        return Parts(item for item in items if not (isinstance(item, str) and not item))

    @property
    def attachments(self) -> list[Attachment]:
        return [item for item in self if isinstance(item, Attachment)]

    def tokens(self, per_text: Any) -> int:
        """About how many input tokens: ``per_text(text)`` for the text, each attachment's estimate."""
        return per_text("".join(item for item in self if isinstance(item, str))) + sum(
            a.tokens for a in self.attachments)

    def text(self) -> str:
        """The text, with each attachment as ``[image/jpeg 800x600, 91 KB]``."""
        return "".join(item if isinstance(item, str) else f"[{item.describe()}]" for item in self)

    def __str__(self) -> str:
        return self.text()


# -- in a template: image(x), document(x) ------------------------------------------------------------

_COLLECTING: contextvars.ContextVar[tuple[str, list[Any]] | None] = contextvars.ContextVar("dbmagic_attachments",
                                                                                             default=None)


@contextlib.contextmanager
def collecting() -> Iterator[Any]:
    """While a template renders: what `image` and `document` add, each marked in the text by a token
    no row can know (a random nonce), so a value that imitates a mark stays text. ``split(text)``
    then gives the rendered text as `Parts`, or the text itself when nothing was attached."""
    nonce = secrets.token_hex(8)
    added: list[Any] = []
    token = _COLLECTING.set((nonce, added))
    mark = re.compile("\x00att" + nonce + r":(\d+)\x00")

    def split(text: str) -> str | Parts:
        if not added:
            return text
        parts, at, placed = Parts(), 0, set()
        for match in mark.finditer(text):
            if match.start() > at:
                parts.append(text[at:match.start()])
            item = added[int(match.group(1))]
            parts.extend(item if isinstance(item, list) else [item])
            placed.add(int(match.group(1)))
            at = match.end()
        if at < len(text):
            parts.append(text[at:])
        if len(placed) < len(added) or any("\x00att" in p for p in parts if isinstance(p, str)):
            raise AttachmentError("image() and document() must stand on their own in the template, as "
                                  "{{ image(x) }}: a filter or string operation on them loses the picture.")
        return parts

    try:
        yield split
    finally:
        _COLLECTING.reset(token)


def _mark(item: Attachment | list[Any]) -> str:
    current = _COLLECTING.get()
    if current is None:
        raise AttachmentError("image() and document() work inside a prompt template ({{ image(x) }}).")
    nonce, added = current
    added.append(item)
    return f"\x00att{nonce}:{len(added) - 1}\x00"


def image(x: Any, max_side: int = MAX_SIDE, quality: int = QUALITY) -> str:
    """In a template, ``{{ image(x) }}``: the picture ``x`` (bytes, a path, a PIL image) where it stands."""
    return _mark(load_image(x, max_side=max_side, quality=quality))


def document(x: Any, as_: str = "images", pages: Any = None, max_side: int = MAX_SIDE) -> str:
    """In a template, ``{{ document(x) }}``: the document ``x`` (a PDF: bytes or a path) where it
    stands, as its pages' images (``as_="images"``), its text (``"text"``) or the file (``"file"``);
    ``pages``: which pages (``3``, ``"1-3"``, ``[1, 4]``; 1-based), at most `MAX_PAGES` unless given."""
    return _mark(load_document(x, as_=as_, pages=pages, max_side=max_side))


def attached(given: list[str], namespace: Any) -> list[Any]:
    """What ``--attach`` adds after the prompt, loaded once: each a notebook variable (bytes, a PIL
    image, a path) or a file path; a PDF goes as its pages' images, anything else as an image."""
    items: list[Any] = []
    for name in given:
        if name.isidentifier() and name in namespace:
            value = namespace[name]
        elif os.path.exists(os.path.expanduser(name)):
            value = name
        else:
            raise AttachmentError(f"--attach {name}: it is neither a variable of the notebook nor a file. Give a "
                                  "variable that holds bytes or a PIL image, or a file's path.")
        items.extend(load_any(value))
    return items


def load_any(value: Any) -> list[Any]:
    """A picture or a PDF (bytes, a path, a PIL image) as the parts it becomes: a PDF its pages' images."""
    is_pdf = (isinstance(value, (bytes, bytearray, memoryview)) and bytes(value[:5]) == b"%PDF-") or (
        isinstance(value, str) and value.lower().endswith(".pdf"))
    return load_document(value) if is_pdf else [load_image(value)]


# -- reading what was given --------------------------------------------------------------------------

def _read(x: Any, what: str) -> tuple[bytes, str]:
    """``(bytes, source)`` of ``x``: bytes as they are, a path's file (a regular file, at most
    `MAX_FILE_BYTES`); a URL is refused (nothing is fetched)."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x), f"{len(x):,} bytes"
    if isinstance(x, os.PathLike):
        x = os.fspath(x)
    if not isinstance(x, str) or not x.strip():
        shown = "nothing (a missing value)" if x is None else f"a {type(x).__name__}"
        raise AttachmentError(f"{what}() takes bytes, a path or a PIL image; it was given {shown}.")
    if re.match(r"^[a-z][a-z0-9+.-]*://", x, re.I) or x.startswith("dbfs:"):
        raise AttachmentError(f"{what}() does not fetch URLs ({x[:80]!r}): give the file's bytes or a path "
                              "(on Databricks, a /Volumes/... path).")
    path = os.path.expanduser(x)
    try:  # opened without blocking and looked at once open: a FIFO or a device is never read, even one
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # swapped in after a look
    except OSError as exc:
        raise AttachmentError(f"{what}() cannot read {x[:200]!r}: {exc.strerror or exc}. Give an existing file "
                              "(on Databricks, a /Volumes/... path).") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
        os.close(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise AttachmentError(f"{what}() reads a regular file; {x[:200]!r} is not one.")
        raise AttachmentError(f"{what}() reads files up to {MAX_FILE_BYTES >> 20} MB; {x[:200]!r} is "
                              f"{info.st_size / 1e6:,.0f} MB.")
    with os.fdopen(descriptor, "rb") as f:  # its size, not the most a file may hold (read(n) makes n bytes)
        return f.read(info.st_size + 1), os.path.basename(path)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigurationError("Images in prompts need Pillow: pip install 'dbmagic[documents]'.") from None
    return Image


def load_image(x: Any, *, max_side: int = MAX_SIDE, quality: int = QUALITY,
               budget: int = MAX_REQUEST_BYTES * 3 // 4 - 64_000) -> Attachment:
    """``x`` as an `Attachment` that fits: as it is when it is a JPEG or PNG within ``max_side`` and
    ``budget`` bytes, else downscaled and re-encoded, and shrunk further until it fits ``budget``
    (what 4 MB holds once base64 adds a third, less room for the text)."""
    Image = _pil()
    if not isinstance(max_side, int) or max_side < MIN_SIDE:
        raise AttachmentError(f"image(max_side=) takes a whole number of pixels of at least {MIN_SIDE}; got {max_side!r}.")
    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise AttachmentError(f"image(quality=) takes a JPEG quality from 1 to 95; got {quality!r}.")
    if hasattr(x, "save") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        picture, data, source = x, None, f"a {x.size[0]}x{x.size[1]} image"
    else:
        data, source = _read(x, "image")
        try:
            picture = Image.open(io.BytesIO(data))  # its header: what it is and its size
            if not _as_is(picture, data, max_side, budget):
                # a JPEG decoded at the smallest of its scales (1/2, 1/4, 1/8) that still holds max_side:
                # a 4000x3000 photo is decoded at 2000x1500, a quarter of the memory and the time
                picture.draft("RGB", _within(picture.size, max_side))
                picture.load()  # its pixels, to be re-encoded (a file cut short fails here)
        except Exception as exc:  # not an image, or a corrupt one: Pillow raises several kinds
            raise AttachmentError(f"image(): {source} is not an image Pillow can read "
                                  f"({exc.__class__.__name__}). Give a JPEG, PNG, GIF or WebP.") from None
    return fit(picture, data, source, max_side=max_side, quality=quality, budget=budget)


def _within(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled so that its longer side is at most ``side`` (never enlarged)."""
    width, height = size
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _as_is(picture: Any, data: bytes | None, max_side: int, budget: int) -> bool:
    """A JPEG or PNG that needs no change: sent as it is (its pixels are never decoded)."""
    return (data is not None and picture.format in SENT_AS_IS and max(picture.size) <= max_side and len(data) <= budget
            and picture.getexif().get(ORIENTATION, 1) == 1)  # not turned by its EXIF (turned, it is re-encoded)


def fit(picture: Any, data: bytes | None, source: str, *, max_side: int, quality: int, budget: int) -> Attachment:
    """The picture as an `Attachment` of at most ``budget`` bytes (see `load_image`)."""
    Image = _pil()
    width, height = picture.size
    if _as_is(picture, data, max_side, budget):
        return Attachment(SENT_AS_IS[picture.format], data, source, width, height)
    if picture.getexif().get(ORIENTATION, 1) != 1:  # a phone's photo: its EXIF orientation, which re-encoding drops,
        from PIL import ImageOps  # applied to the pixels (else the model sees it on its side)

        picture = ImageOps.exif_transpose(picture)
        width, height = picture.size
    clear = picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info)
    side = min(max_side, max(width, height))
    while True:
        size = _within((width, height), side)
        shrunk = picture.resize(size, Image.Resampling.LANCZOS) if size != (width, height) else picture
        out = io.BytesIO()
        if clear:
            shrunk.convert("RGBA").save(out, "PNG", optimize=True)
        else:
            shrunk.convert("RGB").save(out, "JPEG", quality=quality, optimize=True)
        if out.tell() <= budget:
            return Attachment("image/png" if clear else "image/jpeg", out.getvalue(), source, *size)
        if side <= MIN_SIDE:
            raise AttachmentError(f"image(): {source} does not fit the 4 MB request limit even at {side} pixels "
                                  "a side. Send a smaller image, or fewer images in one prompt.")
        side = max(MIN_SIDE, int(side * 0.75))


def _pdfium() -> Any:
    try:
        import pypdfium2
    except ImportError:
        raise ConfigurationError("Documents in prompts need pypdfium2: pip install 'dbmagic[documents]'.") from None
    return pypdfium2


def _pages(pages: Any, count: int, source: str) -> list[int]:
    """0-based page numbers from ``pages`` (1-based: ``3``, ``"1-3"``, ``"1,4"``, a list), at most `MAX_PAGES` by default."""
    if pages is None:
        return list(range(min(count, MAX_PAGES)))
    wanted: list[int] = []
    items = pages if isinstance(pages, (list, tuple, range)) else str(pages).split(",")
    for item in items:
        text = str(item).strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if match is None:
            raise AttachmentError(f"document(pages=) takes page numbers from 1 (3, \"1-3\", [1, 4]); got {pages!r}.")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        wanted.extend(range(first, last + 1))
    outside = [p for p in wanted if not 1 <= p <= count]
    if outside:
        raise AttachmentError(f"document(): {source} has {count} pages; there is no page {outside[0]}.")
    return [p - 1 for p in wanted]


def load_document(x: Any, *, as_: str = "images", pages: Any = None, max_side: int = MAX_SIDE) -> list[Any]:
    """A PDF as the parts it becomes: its pages' images, its text, or the file itself (see `document`)."""
    if as_ not in ("images", "text", "file"):
        raise AttachmentError(f"document(as_=) takes \"images\", \"text\" or \"file\"; got {as_!r}.")
    data, source = _read(x, "document")
    if not data.startswith(b"%PDF-"):
        raise AttachmentError(f"document(): {source} is not a PDF. Give a PDF (for a picture, use image()).")
    if as_ == "file":
        return [Attachment("application/pdf", data, source, filename=source if source.endswith(".pdf") else "document.pdf")]
    pdfium = _pdfium()
    try:
        pdf = pdfium.PdfDocument(data)
    except Exception as exc:
        raise AttachmentError(f"document(): {source} is a PDF that cannot be read ({exc.__class__.__name__}).") from None
    try:
        chosen = _pages(pages, len(pdf), source)
        if as_ == "text":
            texts = []
            for n in chosen:
                page = pdf[n]
                texts.append(page.get_textpage().get_text_range())
            text = "\n\n".join(t.strip() for t in texts)
            if not text.strip():
                raise AttachmentError(f"document(): {source} has no text layer on those pages (a scan?): send its "
                                      "pages as images, document(x, as_=\"images\").")
            return [text]
        out: list[Any] = []
        for n in chosen:
            page = pdf[n]
            width, height = page.get_size()  # points (1/72 inch)
            scale = min(max_side / max(width, height), 200 / 72)  # at most 200 dpi
            picture = page.render(scale=scale).to_pil()
            out.append(fit(picture, None, f"page {n + 1} of {source}", max_side=max_side, quality=QUALITY,
                           budget=MAX_REQUEST_BYTES * 3 // 4 // max(len(chosen), 1)))
        return out
    finally:
        pdf.close()
