"""The documentation: `mkdocs build --strict` passes (a broken link or anchor, or a page left out of
the nav, fails it), every page under docs/ is in mkdocs.yml's nav, the README stays the front door
(under 250 lines) and its links into docs/ reach a page and an anchor that exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README_MAX_LINES = 250


def _nav_pages(nav) -> list[str]:
    """Every page file named in a MkDocs nav (nested sections included)."""
    out: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out += _nav_pages(value)
        else:
            out.append(value)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                        "--site-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, "mkdocs build --strict failed:\n" + r.stdout[-4000:] + r.stderr[-4000:]
    return out


def test_mkdocs_build_strict_passes(site):
    assert (site / "index.html").exists()
    for page in _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]):
        built = site / ("index.html" if page == "index.md" else Path(page).with_suffix("") / "index.html")
        assert built.exists(), f"{page} was not built ({built})"


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config.get("strict") is True
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {nav}"
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, f"pages not in the nav: {sorted(set(pages) - set(nav))}; " \
                                 f"nav entries without a page: {sorted(set(nav) - set(pages))}"


def test_readme_is_the_front_door():
    text = (REPO / "README.md").read_text()
    n = len(text.splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; the reference belongs in docs/ (under {README_MAX_LINES})"
    for needed in ("make demo", "make test", "make experiment MODEL=", "nvidia-smi", "docs/index.md"):
        assert needed in text, needed


def test_readme_links_reach_existing_pages_and_anchors(site):
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), f"README links to {link}: {path} does not exist"
        if anchor:
            rel = target.relative_to(DOCS)
            html = site / ("index.html" if rel.as_posix() == "index.md" else rel.with_suffix("") / "index.html")
            assert f'id="{anchor}"' in html.read_text(), f"README links to {link}: no such anchor on the built page"


def test_lists_and_tables_start_their_own_block():
    """GitHub renders a list or table that follows a paragraph line at once; Python-Markdown (the site)
    folds it into the paragraph. Each needs a blank line before it, and a paragraph after a list too."""
    item = re.compile(r"^([-*]|\d+\.) ")
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        fence, in_list, prev = False, False, ""
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                if not fence and prev.strip() and not line.startswith(" "):
                    bad.append(f"{page.name}:{n}: a code fence right after a paragraph line")
                fence = not fence
            elif not fence and not line.startswith(" ") and line.strip():
                starts_list, starts_table = bool(item.match(line)), line.startswith("|")
                if prev.strip() and not prev.startswith(" ") and (
                        (starts_list and not item.match(prev)) or (starts_table and not prev.startswith("|"))):
                    bad.append(f"{page.name}:{n}: a {'list' if starts_list else 'table'} right after a paragraph line")
                if in_list and not starts_list:
                    bad.append(f"{page.name}:{n}: a paragraph folded into the list above it")
                in_list = starts_list or in_list
            if not line.strip():
                in_list = False
            prev = line
    assert not bad, "\n".join(bad)
