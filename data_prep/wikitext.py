"""Wikitext -> plain text with mwparserfromhell's parse tree.

Dropped: templates, ``<ref>`` and other non-prose tags, tables, file/image/category/interlanguage links, HTML
comments, bare URLs, magic words. Kept: link text, external-link titles, the contents of bold/italic/inline tags.
Headings become paragraph breaks (their text is dropped: a heading is not a sentence). One paragraph per line.
"""

from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

# Tags whose content is not running prose.
DROPPED_TAGS = frozenset(
    "ref references table math chem score timeline gallery graph mapframe maplink imagemap syntaxhighlight source "
    "pre code hiero categorytree templatedata templatestyles inputbox noinclude includeonly style script".split()
)
# Link namespaces that are not prose (plus any "xx:" interlanguage prefix, handled below).
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "special:", ":category:", ":file:")
INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:", re.IGNORECASE)
MAGIC_WORD = re.compile(r"__[A-Z]+__")
EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
MULTI_SPACE = re.compile(r"[ \t\u00a0]+")
BARE_URL = re.compile(r"\bhttps?://\S+")
# Fallbacks for markup the parser leaves as text when it is malformed (unclosed refs, unbalanced quotes...).
LEFTOVER_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?(?:</ref>|$)", re.IGNORECASE)
LEFTOVER_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
LEFTOVER_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
LEFTOVER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
LEFTOVER_BRACKETS = re.compile(r"\[\[|\]\]|\{\{|\}\}")
POSSESSIVE_AFTER_STYLE = re.compile(r"'{2,}(?=s\b)")
STYLE_QUOTES = re.compile(r"'{2,}")


def _link_is_prose(title: str) -> bool:
    lowered = title.strip().lower()
    return not lowered.startswith(DROPPED_LINK_PREFIXES) and not INTERLANGUAGE.match(lowered)


def _render(code: Wikicode, out: list[str]) -> None:
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(str(node.value))
        elif isinstance(node, Wikilink):
            title = str(node.title)
            if _link_is_prose(title):
                if node.text is not None:
                    _render(node.text, out)
                else:
                    out.append(title.lstrip(":").split("#", 1)[0] or title.split("#", 1)[-1])
        elif isinstance(node, Tag):
            tag = str(node.tag).lower().strip()
            if tag in DROPPED_TAGS or node.wiki_markup == "{|":
                continue
            if tag == "br":
                out.append("\n")
            elif tag in ("li", "dt", "dd"):
                # A list item's marker ("*", "#", ":", ";") is the tag; its text follows as plain nodes.
                if node.contents is not None:
                    _render(node.contents, out)
            elif node.contents is not None and not node.self_closing:
                _render(node.contents, out)
        elif isinstance(node, Heading):
            out.append("\n\n")
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, (Template, Comment, Argument)):
            continue
        # Anything else (a parser node we do not know) carries no prose.


def _scrub_leftovers(line: str) -> str:
    if "[[" in line and not _link_is_prose(line.split("[[", 1)[1].split("|", 1)[0].split("]]", 1)[0]):
        return ""  # an unclosed file/category link: its caption is not article prose
    line = LEFTOVER_REF.sub("", line)
    line = LEFTOVER_TAG.sub("", line)
    line = LEFTOVER_LINK.sub(r"\1", line)
    line = LEFTOVER_TEMPLATE.sub("", line)
    line = LEFTOVER_BRACKETS.sub("", line)
    line = POSSESSIVE_AFTER_STYLE.sub("'", line)
    return STYLE_QUOTES.sub("", line)


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of an article: one paragraph per line, no markup left."""
    pieces: list[str] = []
    _render(mwparserfromhell.parse(wikitext, skip_style_tags=False), pieces)
    text = MAGIC_WORD.sub("", "".join(pieces))
    text = BARE_URL.sub("", text)
    paragraphs = []
    for line in text.split("\n"):
        line = _scrub_leftovers(line)
        line = MULTI_SPACE.sub(" ", line)
        line = EMPTY_PARENS.sub("", line)
        line = SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        # Leftover table/template fragments from malformed markup start with these; they are never prose.
        if line and not line.startswith(("{|", "|", "!", "{{", "}}")):
            paragraphs.append(line)
    return "\n".join(paragraphs)
