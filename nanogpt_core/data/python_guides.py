"""CPython's prose documents that ship inside the standard library, as demo-corpus documents.

A CPython install carries a few documents besides docstrings: IDLE's user manual (the HTML
page IDLE shows under Help), the notes on writing IDLE extensions and its change history,
and the email package's design notes. They are the Python documentation's own text, under the
PSF License like the rest of CPython. Files a build does not ship are skipped.
"""

from __future__ import annotations

import html.parser
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from nanogpt_core.data.documents import Document

# (document name, path under the standard library), in the order they are yielded
GUIDES = (
    ("idle-manual", "idlelib/help.html"),
    ("idle-readme", "idlelib/README.txt"),
    ("idle-extensions", "idlelib/extend.txt"),
    ("idle-news", "idlelib/NEWS.txt"),
    ("idle-history", "idlelib/HISTORY.txt"),
    ("email-architecture", "email/architecture.rst"),
)
# Elements whose text is not part of the page's reading text.
SKIPPED_ELEMENTS = frozenset({"head", "script", "style", "nav"})
# Elements that never have an end tag, so they open no level of nesting.
VOID_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                           "track", "wbr"})
# Elements that end a line of reading text.
BLOCK_ELEMENTS = frozenset({"p", "div", "section", "li", "dt", "dd", "pre", "tr", "br",
                            "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl"})


def iter_python_guides(stdlib: Path | None = None) -> Iterator[Document]:
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    for name, relative in GUIDES:
        path = stdlib / relative
        if not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = html_to_text(raw) if path.suffix == ".html" else raw
        text = _tidy(text)
        if text:
            yield Document(id=f"python-guide/{name}", text=text)


def html_to_text(page: str) -> str:
    """The reading text of an HTML page, a line per block, without head, scripts or navigation.

    Where the page marks its main content (`role="main"`, as Sphinx does), only that is read:
    the rest is the site's menus and footer.
    """
    parser = _TextExtractor(main_only='role="main"' in page)
    parser.feed(page)
    parser.close()
    return "".join(parser.parts)


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self, main_only: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.in_pre = 0
        self.main_only = main_only
        self.main_depth = 0  # open elements inside the main content, that element included

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in VOID_ELEMENTS:
            if self.main_depth:
                self.main_depth += 1
            elif ("role", "main") in attrs:
                self.main_depth = 1
        if tag in SKIPPED_ELEMENTS:
            self.skipping += 1
        elif tag == "pre":
            self.in_pre += 1
        if tag in BLOCK_ELEMENTS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.main_depth and tag not in VOID_ELEMENTS:
            self.main_depth -= 1
        if tag in SKIPPED_ELEMENTS:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "pre":
            self.in_pre = max(0, self.in_pre - 1)
        if tag in BLOCK_ELEMENTS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skipping or (self.main_only and not self.main_depth):
            return
        # Source line breaks inside a paragraph are layout, not text; inside <pre> they are text.
        self.parts.append(data if self.in_pre else re.sub(r"\s+", " ", data))


def _tidy(text: str) -> str:
    """Trailing spaces gone, runs of blank lines cut to one, Sphinx's pilcrow anchors removed."""
    lines = [line.rstrip() for line in text.replace("\u00b6", "").splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line if line.strip() else "" for line in lines)).strip()
