"""Reading text corpora into documents: plain text (``.txt``, ``.txt.gz``), HTML (``.html``, ``.htm``,
``.xhtml``, optionally gzipped) and JSON lines (``.jsonl``, ``.jsonl.gz``), for `mmoe.data.writers.TextSource`.

* **Blocks.** A file becomes a list of `Block`: headings and paragraphs. Plain text: paragraphs are separated
  by blank lines, their lines joined with spaces; a one-line paragraph at column 0 that looks like a numbered
  heading (``2.3. Title``, ``Chapter 2. Title``, ``Annexe A. Title``, ``第 2 章 Title``) is a heading whose
  number (``2.3``) gives its chapter (``2``). HTML is parsed with BeautifulSoup; ``h1``-``h6`` are
  headings, every block element ends a paragraph, ``pre`` keeps its lines; scripts, styles and navigation
  (``nav``, ``role="navigation"``, classes with ``nav``) are left out.
* **Documents.** `documents` cuts the blocks into documents of at most ``max_chars`` characters
  (``unit="paragraph"``: paragraphs packed in order; ``unit="section"``: a new document at every heading
  too). A document below ``min_chars`` is merged into the next one of its group, or dropped (counted) at a
  group's end.
* **Groups.** Every document carries a group, the unit of the train/validation split: the file's path
  with its language left out (``debian-reference.fr.txt.gz`` and ``debian-reference.de.txt.gz`` are both
  ``debian-reference.txt``), plus the section (two levels, ``#2.3``) when headings are numbered. So the
  parts of one section, and the same section in every translation, land in the same split: no
  near-duplicate leakage. (Below, "chapter" means this numbered unit.)
* **Language** from the path (`language_of`): a dotted part of the file name (``ch07.en.html``,
  ``book.pt-br.txt.gz``), the file stem (``en.txt``), or the nearest folder named like a language tag.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

__all__ = ["Block", "text_kind", "read_text_file", "text_blocks", "html_blocks", "documents", "language_of",
           "group_of", "LANG_RE"]

LANG_RE = re.compile(r"^[a-z]{2}(?:[-_][A-Za-z0-9]{2,8})*$")
_KINDS = {".txt": "txt", ".html": "html", ".htm": "html", ".xhtml": "html", ".jsonl": "jsonl"}
_HEADING_RE = re.compile(r"^(?:[^\W\d_][\w]*\s+)?(\d+|[A-Z])((?:\.\d+)*)\.\s+\S|^第\s*(\d+)\s*章")


@dataclass(frozen=True)
class Block:
    """A heading (``heading=True``, ``chapter`` from its number when numbered) or a paragraph."""

    text: str
    heading: bool = False
    chapter: str | None = None


def _suffixes(name: str) -> tuple[str, bool]:
    """``(kind suffix, gzipped)`` of a file name, e.g. ``("txt", True)`` for ``x.fr.txt.gz``."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    if gz:
        lower = lower[:-3]
    return _KINDS.get(PurePosixPath(lower).suffix, ""), gz


def text_kind(path: str | Path) -> str | None:
    """``"txt"``, ``"html"`` or ``"jsonl"`` for a file this module reads (gzipped or not), else None."""
    kind, _ = _suffixes(Path(path).name)
    return kind or None


def read_text_file(path: str | Path) -> str:
    """A file's text: gunzipped when it ends in ``.gz``, UTF-8 (a byte order mark is dropped). Raises
    `OSError` (unreadable, bad gzip data) or `UnicodeDecodeError`."""
    path = Path(path)
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.decompress(data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8")


def _heading(line: str) -> Block | None:
    if not line or line[0].isspace() or len(line) > 160:
        return None
    m = _HEADING_RE.match(line)
    if m is None:
        return None
    if m.group(3):
        return Block(" ".join(line.split()), heading=True, chapter=m.group(3))
    sub = m.group(2).split(".")[1:2]  # "2.3.1." -> section 2.3: the split unit (module docstring)
    return Block(" ".join(line.split()), heading=True, chapter=".".join([m.group(1)] + sub))


def text_blocks(text: str) -> list[Block]:
    """Paragraphs (blank-line separated, lines joined with spaces) and numbered headings of plain text."""
    blocks: list[Block] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            head = _heading(para[0]) if len(para) == 1 else None
            blocks.append(head or Block(" ".join(" ".join(p.split()) for p in para)))
            para.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.strip():
            para.append(line.rstrip())
        else:
            flush()
    flush()
    return blocks


_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "body", "br", "caption", "dd", "div", "dl", "dt",
               "figcaption", "figure", "footer", "form", "header", "hr", "li", "main", "ol", "p", "section",
               "table", "tbody", "td", "tfoot", "th", "thead", "title", "tr", "ul"}
_SKIP_TAGS = {"script", "style", "noscript", "nav", "head", "template", "svg", "button", "select"}
_HEADINGS = {f"h{i}" for i in range(1, 7)}


def _is_navigation(tag) -> bool:
    if tag.get("role") == "navigation":
        return True
    return any("nav" in c.lower() for c in (tag.get("class") or []))


def html_blocks(html: str) -> list[Block]:
    """Headings and paragraphs of an HTML page (BeautifulSoup with Python's ``html.parser``)."""
    from bs4 import BeautifulSoup
    from bs4.element import Comment, Doctype, NavigableString, ProcessingInstruction, Tag

    soup = BeautifulSoup(html, "html.parser")
    root = soup.body or soup
    blocks: list[Block] = []
    buf: list[str] = []

    def flush() -> None:
        text = " ".join("".join(buf).split())
        buf.clear()
        if text:
            blocks.append(Block(text))

    def walk(node) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                buf.append(str(child))
                continue
            if not isinstance(child, Tag) or child.name in _SKIP_TAGS or _is_navigation(child):
                continue
            if child.name in _HEADINGS:
                flush()
                text = " ".join(child.get_text(" ").split())
                if text:
                    head = _heading(text)
                    blocks.append(Block(text, heading=True, chapter=head.chapter if head else None))
                continue
            if child.name == "pre":
                flush()
                text = child.get_text().strip("\n")
                if text.strip():
                    blocks.append(Block(text))
                continue
            block = child.name in _BLOCK_TAGS
            if block:
                flush()
            walk(child)
            if block:
                flush()

    walk(root)
    flush()
    return blocks


def documents(blocks: list[Block], *, unit: str, max_chars: int = 2000, min_chars: int = 100
              ) -> tuple[list[tuple[str, str | None, str | None]], int]:
    """``([(text, chapter, first heading), ...], dropped)``: the documents of ``blocks`` (module docstring).

    ``unit``: ``"paragraph"`` (paragraphs packed in order up to ``max_chars``) or ``"section"`` (also a new
    document at every heading). Paragraphs are joined with blank lines; one longer than ``max_chars`` is a
    document of its own (never cut inside), and a piece below ``min_chars`` (a heading) stays with what follows
    it even past ``max_chars``. A new chapter always starts a new document. A document shorter
    than ``min_chars`` joins the next one of its chapter, or is dropped at the chapter's end (``dropped``
    counts those)."""
    if unit not in ("paragraph", "section"):
        raise ValueError(f"unit must be 'paragraph' or 'section', got {unit!r}")
    out: list[tuple[str, str | None, str | None]] = []
    dropped = 0
    chapter: str | None = None
    parts: list[str] = []
    title: str | None = None

    def emit(chapter_end: bool) -> None:
        nonlocal parts, title, dropped
        text = "\n\n".join(parts)
        if not text or (len(text) < min_chars and not chapter_end):
            return  # nothing yet, or too short: it joins the next document
        if len(text) >= min_chars:
            out.append((text, chapter, title))
        else:
            dropped += 1
        parts, title = [], None

    for b in blocks:
        if b.heading and b.chapter is not None and b.chapter != chapter:
            emit(chapter_end=True)
            parts, title = [], None  # (a dropped remainder is gone)
            chapter = b.chapter
        elif parts and ((b.heading and unit == "section") or len("\n\n".join(parts + [b.text])) > max_chars):
            emit(chapter_end=False)
        if not parts and b.heading:
            title = b.text
        parts.append(b.text)
    emit(chapter_end=True)
    return out, dropped


def language_of(rel: str, given: str | None = None) -> str | None:
    """The language tag of a file at ``rel`` (a path relative to the corpus folder): ``given``, else a
    dotted part of its name (``ch07.en.html``), its stem (``en.txt``), or the nearest folder so named."""
    if given:
        return given
    p = PurePosixPath(rel)
    name = re.sub(r"\.gz$", "", p.name, flags=re.I)
    parts = name.split(".")
    if len(parts) > 1 and parts[-1].lower() in {k.lstrip(".") for k in _KINDS}:
        parts = parts[:-1]  # the kind suffix (txt, html, ...)
    if len(parts) == 1:
        parts = [parts[0], ""]
    for part in reversed(parts[1:]):  # name components after the first: x.<lang>.txt.gz
        if LANG_RE.match(part):
            return part
    if LANG_RE.match(parts[0]):
        return parts[0]
    for folder in reversed(p.parent.parts):
        if LANG_RE.match(folder):
            return folder
    return None


def group_of(rel: str, lang: str | None, chapter: str | None = None) -> str:
    """The split group of a document: its file's path with the language (a dotted name part or a folder)
    and ``.gz`` left out, plus ``#chapter`` when known."""
    p = PurePosixPath(rel)
    folders = [f for f in p.parent.parts if f != lang]
    name = p.name[:-3] if p.name.lower().endswith(".gz") else p.name
    pieces = name.split(".")
    if len(pieces) > 1 and pieces[0] == lang:
        pieces = pieces[1:]
    name = ".".join([pieces[0]] + [x for x in pieces[1:] if x != lang])
    path = "/".join(folders + [name])
    return f"{path}#{chapter}" if chapter is not None else path
