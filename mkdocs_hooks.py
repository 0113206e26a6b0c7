"""MkDocs hook (mkdocs.yml `hooks:`): the pages are written to read the same on GitHub and on the site.

GitHub's tables split a row at every `|`, even inside a code span, so the pages escape it there as
`\\|`; Python-Markdown's tables do not split inside code spans and would show the backslash. This
hook drops the backslash inside code spans of table rows before the page is rendered."""
from __future__ import annotations

import re

_CODE = re.compile(r"(`+)(.+?)\1")


def _unescape_pipes_in_code(line: str) -> str:
    return _CODE.sub(lambda m: m.group(1) + m.group(2).replace("\\|", "|") + m.group(1), line)


def on_page_markdown(markdown: str, **_kwargs) -> str:
    out, fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and line.lstrip().startswith("|"):
            line = _unescape_pipes_in_code(line)
        out.append(line)
    return "\n".join(out)
