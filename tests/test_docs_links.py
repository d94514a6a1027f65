"""Every relative link of README.md and docs/*.md points at a file of the repository: no link leaves
it (a clone has nothing beside it) and none points at a file that is not there."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

# [text](target) and ![alt](target), with an optional "title"; <target> form too
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def links(text):
    """The link targets of markdown text, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text) + _REF.findall(text)


def broken_links(path, root=ROOT):
    """[(target, why)] for each relative link of the markdown file path (relative to root) that does not
    point at an existing file inside root."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        text = f.read()
    bad = []
    for target in links(text):
        if _EXTERNAL.match(target) or target.startswith("#"):
            continue
        rel = target.split("#", 1)[0].split("?", 1)[0]
        full = os.path.normpath(os.path.join(root, os.path.dirname(path), rel))
        if os.path.commonpath([full, os.path.normpath(root)]) != os.path.normpath(root):
            bad.append((target, "outside the repository"))
        elif not os.path.exists(full):
            bad.append((target, "no such file"))
    return bad


def test_docs_found():
    assert "docs/ARCHITECTURE.md" in DOCS


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, f"{path}: broken links: {bad}"


def test_the_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "[design](../shared/DESIGN.md) ![pic](docs/a.png) [gone](docs/gone.md#x) [web](https://x.org/a)\n"
        "[ok](docs/a.png#frag) [anchor](#section) `[code](nowhere.md)`\n```\n[block](nowhere.md)\n```\n"
        "[ref]: missing.md\n")
    assert broken_links("README.md", str(tmp_path)) == [
        ("../shared/DESIGN.md", "outside the repository"), ("docs/gone.md#x", "no such file"),
        ("missing.md", "no such file")]
