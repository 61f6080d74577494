"""The report as a document: a list of Heading, Paragraph, Bullets, Table and Figure blocks whose text is plain
strings, ``Code`` and ``Strong`` spans, and the two renderers (Markdown with PNG files beside it, self-contained
HTML with the PNGs embedded), so the two files a report writes cannot say different things."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


Text = str | Code | Strong | tuple  # a tuple holds spans in order


@dataclass(frozen=True)
class Heading:
    level: int
    text: Text


@dataclass(frozen=True)
class Paragraph:
    text: Text


@dataclass(frozen=True)
class Bullets:
    items: tuple


@dataclass(frozen=True)
class Table:
    rows: tuple  # of rows of Text; the first row is the header


@dataclass(frozen=True)
class Figure:
    name: str  # the PNG's file name in plots/, without .png
    title: str
    png: bytes


Block = Heading | Paragraph | Bullets | Table | Figure


def _spans(text: Text) -> tuple:
    return text if isinstance(text, tuple) else (text,)


# --- Markdown ----------------------------------------------------------------------------------------------------


def _md_inline(text: Text, in_table: bool = False) -> str:
    out = []
    for span in _spans(text):
        if isinstance(span, Code):
            # a fence longer than any backtick run inside; padded when the text itself starts or ends with one
            fence = "`" * (max((len(r) for r in re.findall("`+", span.text)), default=0) + 1)
            pad = " " if span.text.startswith("`") or span.text.endswith("`") else ""
            body = span.text.replace("|", "\\|") if in_table else span.text
            out.append(f"{fence}{pad}{body}{pad}{fence}")
        else:
            plain = re.sub(r"([\\`*_<|])", r"\\\1", span.text if isinstance(span, Strong) else span)
            out.append(f"**{plain}**" if isinstance(span, Strong) else plain)
    return "".join(out).replace("\n", " ")


def to_markdown(doc: list[Block]) -> str:
    parts = []
    for block in doc:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + _md_inline(block.text))
        elif isinstance(block, Paragraph):
            parts.append(_md_inline(block.text))
        elif isinstance(block, Bullets):
            parts.append("\n".join("- " + _md_inline(item) for item in block.items))
        elif isinstance(block, Table):
            head, *body = block.rows
            lines = ["| " + " | ".join(_md_inline(c, True) for c in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_inline(c, True) for c in row) + " |" for row in body]
            parts.append("\n".join(lines))
        else:
            parts.append(f"![{block.title}](plots/{block.name}.png)")
    return "\n\n".join(parts) + "\n"


# --- HTML --------------------------------------------------------------------------------------------------------

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
          "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
          "code{white-space:pre;background:#f3f3f3;padding:0 2px}figure{margin:1em 0}img{max-width:100%}")


def _html_inline(text: Text) -> str:
    out = []
    for span in _spans(text):
        if isinstance(span, Code):
            out.append(f"<code>{html.escape(span.text)}</code>")
        elif isinstance(span, Strong):
            out.append(f"<strong>{html.escape(span.text)}</strong>")
        else:
            out.append(html.escape(span))
    return "".join(out)


def to_html(doc: list[Block], title: str) -> str:
    parts = []
    for block in doc:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_html_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head, *body = block.rows
            parts.append("<table><thead><tr>" + "".join(f"<th>{_html_inline(c)}</th>" for c in head) +
                         "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row)
                                                         + "</tr>" for row in body) + "</tbody></table>")
        else:
            src = "data:image/png;base64," + base64.b64encode(block.png).decode()
            parts.append(f"<figure><img alt=\"{html.escape(block.title)}\" src=\"{src}\">"
                         f"<figcaption>{html.escape(block.title)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts) +
            "\n</body></html>\n")
