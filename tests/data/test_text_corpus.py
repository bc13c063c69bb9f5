"""Real-corpus text input: .txt.gz and HTML readers, document cutting, language from the path, and the
leakage-free train/validation split (one section, in every translation, in one split only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mmoe.data import DataError
from mmoe.data.text import Block, documents, group_of, html_blocks, language_of, text_blocks
from mmoe.data.writers import write_text
from tests.data.test_data import _read_all

BOOK = {  # a tiny "translated book": the layout of Debian's plain-text manuals (headings at column 0)
    "en": ("Chapter", "Introduction", "This is about packages"),
    "fr": ("Chapitre", "Introduction", "Ceci parle des paquets"),
}


def _book(lang: str, chapters: int = 6, sections: int = 3) -> str:
    word, intro, body = BOOK[lang]
    out = ["Title of the book", "", "    Table of contents", "    1. first", ""]
    for c in range(1, chapters + 1):
        out += [f"{word} {c}. {intro} {c}", "", f"    {body} in chapter {c}, which is long enough to", "    be kept.", ""]
        for s in range(1, sections + 1):
            out += [f"{c}.{s}. Section {c}.{s}", ""]
            out += [f"    {body}, chapter {c} section {s}, paragraph {p}: " + "words " * 12 + "end." for p in range(3)
                    for _ in [0]] + [""]
            out += [f"{c}.{s}.1. Sub {c}.{s}.1", "", f"    {body} in a subsection {c}.{s}.1 " + "more " * 20, ""]
    return "\n".join(out)


def test_text_blocks_find_paragraphs_and_numbered_headings():
    blocks = text_blocks(_book("fr", chapters=1, sections=1))
    heads = [(b.text, b.chapter) for b in blocks if b.heading]
    assert heads == [("Chapitre 1. Introduction 1", "1"), ("1.1. Section 1.1", "1.1"), ("1.1.1. Sub 1.1.1", "1.1")]
    # indented lines of one paragraph are joined; an indented "1. first" is not a heading
    assert Block("Ceci parle des paquets in chapter 1, which is long enough to be kept.") in blocks
    assert Block("Table of contents 1. first") in blocks
    assert text_blocks("第 3 章 网络设置\n\n    正文\n")[0] == Block("第 3 章 网络设置", heading=True, chapter="3")
    assert text_blocks("Annexe A. Annexe\n")[0].chapter == "A"
    assert not text_blocks("A good idea is to start here.\n")[0].heading  # no number: prose


def test_html_blocks_keep_structure_and_leave_out_navigation():
    html = """<!DOCTYPE html><html><head><title>T</title><style>p {}</style></head><body>
    <div class="navheader">Prev <a href="x">Next</a></div>
    <nav>Home | Up</nav>
    <h2 class="title">2.3. Apt <code>sources</code></h2>
    <p>The <code>apt</code> tool
       reads <em>sources.list</em>.</p><!-- a comment -->
    <ul><li>first item</li><li><p>second</p> item</li></ul>
    <pre>line 1
  line 2</pre><script>var x = 1;</script>
    <table><tr><td>cell a</td><td>cell b</td></tr></table>
    </body></html>"""
    blocks = html_blocks(html)
    assert blocks[0] == Block("2.3. Apt sources", heading=True, chapter="2.3")
    assert [b.text for b in blocks[1:]] == ["The apt tool reads sources.list.", "first item", "second", "item",
                                           "line 1\n  line 2", "cell a", "cell b"]


def test_documents_pack_paragraphs_within_limits():
    paras = [Block("x" * 60) for _ in range(10)]
    docs, dropped = documents(paras, unit="paragraph", max_chars=200, min_chars=10)
    assert [len(d[0]) for d in docs] == [184, 184, 184, 60] and dropped == 0  # 3 x 60 + 2 x 2 separators
    docs, _ = documents([Block("y" * 500), Block("z" * 50)], unit="paragraph", max_chars=200, min_chars=10)
    assert [len(d[0]) for d in docs] == [500, 50]  # a long paragraph is never cut inside
    # sections: a new document at each heading; a short one joins the next of its section ...
    blocks = [Block("1. One", True, "1"), Block("a" * 30), Block("1.1. Sub", True, "1.1"), Block("b" * 30),
              Block("Free heading", True, None), Block("c" * 120), Block("2. Two", True, "2"), Block("tiny")]
    docs, dropped = documents(blocks, unit="section", max_chars=1000, min_chars=50)
    assert [(d[1], d[2], d[0][:8]) for d in docs] == [("1.1", "1.1. Sub", "1.1. Sub")]
    assert "c" * 120 in docs[0][0] and "Free heading" in docs[0][0]
    # ... and at a section's end a remainder under min_chars is dropped and counted ("1. One" + 30 a's, "2. Two")
    assert dropped == 2


def test_language_and_group_come_from_the_path():
    cases = {"debian-reference.fr.txt.gz": ("fr", "debian-reference.txt"), "en.txt": ("en", "txt"),
             "de/news.txt": ("de", "news.txt"), "ch07.zh-cn.html": ("zh-cn", "ch07.html"),
             "guide/pt/ch01s02.html.gz": ("pt", "guide/ch01s02.html"), "notes.txt": (None, "notes.txt")}
    for rel, (lang, group) in cases.items():
        assert language_of(rel) == lang, rel
        assert group_of(rel, lang) == group, rel
    assert group_of("debian-reference.de.txt.gz", "de", "4.2") == "debian-reference.txt#4.2"
    assert language_of("notes.txt", "xx") == "xx"


def test_gzipped_translations_split_by_section_without_leakage(tmp_path: Path):
    src = tmp_path / "corpus"
    src.mkdir()
    for lang in BOOK:
        (src / f"book.{lang}.txt.gz").write_bytes(gzip.compress(_book(lang).encode()))
    manifest = write_text(src, tmp_path / "shards", unit="section", val_fraction=0.3, max_chars=400, min_chars=40)
    assert manifest.info["languages"] == ["en", "fr"] and manifest.info["unit"] == "section"
    samples = {split: _read_all(tmp_path / "shards", split=split) for split in ("train", "val")}
    meta = {split: [json.loads(s["json"]) for s in ss] for split, ss in samples.items()}
    groups = {split: {m["group"] for m in ms} for split, ms in meta.items()}
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]
    # a section is in one split in every language: its translation never sits on the other side
    for split, ms in meta.items():
        by_lang = {lang: {m["group"] for m in ms if m["lang"] == lang} for lang in BOOK}
        assert by_lang["en"] == by_lang["fr"] == groups[split], split
    assert all(g == "book.txt" or g.startswith("book.txt#") for g in groups["train"] | groups["val"])  # front matter: the file
    # every document within max_chars, or one paragraph (with the short heading before it), and every
    # paragraph of the book kept
    texts = [s["txt"].decode() for ss in samples.values() for s in ss]
    assert all(len(t) <= 400 or t.count("\n\n") <= 1 for t in texts) and max(map(len, texts)) > 400
    joined = "\n".join(texts)
    assert all(f"chapter {c} section {s}, paragraph {p}" in joined for c in range(1, 7) for s in (1, 2, 3)
               for p in range(3))
    # the same corpus cut by paragraph is split by the same groups
    write_text(src, tmp_path / "paras", unit="paragraph", val_fraction=0.3, max_chars=400, min_chars=40)
    val = {json.loads(s["json"])["group"] for s in _read_all(tmp_path / "paras", split="val")}
    assert val == groups["val"]


def test_html_and_jsonl_corpora(tmp_path: Path):
    src = tmp_path / "corpus"
    (src / "de").mkdir(parents=True)
    (src / "de" / "page.html").write_text("<html><body><h1>1. Titel</h1><p>" + "Wort " * 40 + "</p>"
                                          "<h2>1.1. Teil</h2><p>" + "Satz " * 40 + "</p></body></html>")
    rows = [{"text": "a record in English " * 3, "id": 7}, {"text": "un document", "lang": "fr"}, {"text": ""}]
    (src / "en.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = write_text(src, tmp_path / "out", unit="section", min_chars=20)
    assert manifest.info["docs_per_language"] == {"de": 2, "en": 1, "fr": 1}
    got = [(json.loads(s["json"])["lang"], s["txt"].decode()[:11]) for s in _read_all(tmp_path / "out")]
    assert got == [("de", "1. Titel\n\nW"), ("de", "1.1. Teil\n\n"), ("en", "a record in"), ("fr", "un document")]
    (src / "bad.jsonl").write_text('{"text": "ok", "lang": "en"}\n{"txt": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string field 'text'"):
        write_text(src, tmp_path / "bad", unit="line")
    (src / "bad.jsonl").write_bytes(b"\x1f\x8b garbage")
    (src / "bad.jsonl").rename(src / "bad.jsonl.gz")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot read"):
        write_text(src, tmp_path / "bad2", unit="line")


def test_include_keeps_one_format_of_a_book_shipped_twice(tmp_path: Path, capsys):
    from mmoe.cli import main
    from mmoe.errors import DataWarning

    src = tmp_path / "corpus"
    src.mkdir()
    for lang in BOOK:  # Debian's manuals ship the same book as .txt.gz and as HTML chapters
        (src / f"book.{lang}.txt.gz").write_bytes(gzip.compress(_book(lang, chapters=2).encode()))
        (src / f"ch01.{lang}.html").write_text(f"<html><body><h1>1. {BOOK[lang][1]}</h1><p>"
                                               + f"{BOOK[lang][2]} " * 20 + "</p></body></html>")
    with pytest.warns(DataWarning, match=r"both plain-text and HTML files in 2 language\(s\) \(en, \.\.\.\).*--include"):
        both = write_text(src, tmp_path / "both", unit="section", min_chars=20)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # one format: no warning
        only = write_text(src, tmp_path / "only", unit="section", min_chars=20, include=["*.txt.gz"])
    sources = {json.loads(s["json"])["source"] for s in _read_all(tmp_path / "only")}
    assert sources == {"book.en.txt.gz", "book.fr.txt.gz"}
    assert only.info["docs_per_language"]["en"] == both.info["docs_per_language"]["en"] - 1
    # a pattern may name a path under the folder; several patterns add up
    by_path = write_text(src, tmp_path / "path", unit="section", min_chars=20, include=["ch01.fr.*", "*.en.txt.gz"])
    assert by_path.info["docs_per_language"] == {"en": only.info["docs_per_language"]["en"], "fr": 1}
    with pytest.raises(DataError, match=r"corpus: no text files match --include \*\.pdf"):
        write_text(src, tmp_path / "none", include=["*.pdf"])
    # the command line: --include, and the warning as one line without a traceback or source line
    assert main(["shards", "text", str(src), str(tmp_path / "cli"), "--unit", "section", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("mmoe: warning: ") and "both plain-text and HTML" in err and "writers.py" not in err
    assert main(["shards", "text", str(src), str(tmp_path / "cli2"), "--unit", "section", "--quiet",
                 "--include", "*.txt.gz"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["shards", "text", str(src), str(tmp_path / "cli3"), "--include", "*.pdf"]) == 2
    assert "error: " in capsys.readouterr().err
