"""docs/methods.md stays current: every registered method and option is named there, every link to it resolves."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from dwakd.methods import get_method, method_names

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
LINK = re.compile(r"docs/methods\.md#([A-Za-z0-9_\-]+)")
SCANNED = ("src", "tests", "configs", "benchmarks", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml"}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of every heading: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link keeps its text
        text = text.replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def section(markdown: str, title: str) -> str:
    """Text of the level-2 section `title` (up to the next level-2 heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    assert match, f"docs/methods.md has no '## {title}' section"
    return match.group(1)


def test_heading_anchors_follow_github_rules() -> None:
    text = "# Top\n## 4. DSKD-CMA\n### 5.3 Attention-informed band\n## Notes\n```\n## not a heading\n```\n## Notes\n"
    assert heading_anchors(text) == {"top", "4-dskd-cma", "53-attention-informed-band", "notes", "notes-1"}


def builtin_method_names() -> list[str]:
    """Registered names of dwakd's own methods (test modules register test-only methods when they are imported)."""
    return [name for name in method_names() if get_method(name)[0].__module__.startswith("dwakd.")]


def test_every_registered_method_is_listed() -> None:
    """Each name `dwakd methods` prints has a row in 'Methods at a glance' (which links to its section)."""
    table = section(METHODS_DOC.read_text(encoding="utf-8"), "Methods at a glance")
    missing = [name for name in builtin_method_names() if f"| `{name}` |" not in table]
    assert not missing, f"add these methods to docs/methods.md 'Methods at a glance': {missing}"


def test_readme_lists_every_method() -> None:
    """The README's methods table names every registered method (in a row's first cell, alone or with presets)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"^## Methods\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    assert table, "README.md has no '## Methods' section"
    first_cells = " ".join(line.split("|")[1] for line in table.group(1).splitlines() if line.startswith("| `"))
    missing = [name for name in builtin_method_names() if f"`{name}`" not in first_cells]
    assert not missing, f"add these methods to the README's methods table: {missing}"


def test_every_option_is_named() -> None:
    """Each option of each registered method appears in backticks somewhere in docs/methods.md."""
    doc = METHODS_DOC.read_text(encoding="utf-8")
    missing = sorted({
        f"{name}.{field.name}"
        for name in builtin_method_names()
        for field in dataclasses.fields(get_method(name)[0].Options)
        if f"`{field.name}`" not in doc
    })
    assert not missing, f"document these options in docs/methods.md: {missing}"


def _linking_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SCANNED:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return files


def test_links_to_methods_doc_resolve() -> None:
    """Every link docs/methods.md#<anchor> in the repository and every (#<anchor>) link in the doc names a heading."""
    doc = METHODS_DOC.read_text(encoding="utf-8")
    anchors = heading_anchors(doc)
    broken = [f"docs/methods.md: #{a}" for a in re.findall(r"\]\(#([^)]+)\)", doc) if a not in anchors]
    for path in _linking_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            broken += [f"{path.relative_to(ROOT)}:{number}: #{a}" for a in LINK.findall(line) if a not in anchors]
    assert not broken, "links to headings that docs/methods.md does not have:\n" + "\n".join(broken)


@pytest.mark.parametrize("anchor", ["4-dskd-cma", "5-dwa-kd", "8-soft-dtw", "notation"])
def test_anchors_cited_by_the_code_exist(anchor: str) -> None:
    assert anchor in heading_anchors(METHODS_DOC.read_text(encoding="utf-8"))


SECTION_REF = re.compile(r"docs/methods\.md §(\d+(?:\.\d+)?)")
# Whole-word SPEC (not _SPEC or SPECIAL): the project's first brief, a file outside the repository that no reader has.
BRIEF_REF = re.compile(r"\bSPEC\b")
BRIEF_PATH = re.compile(r"(\.\./|/work/)shared\b")
# test_config_checks asserts that recipes do not say SPEC; recorded benchmark results keep the path they ran on.
BRIEF_REF_ALLOWED = {Path(__file__).resolve(), ROOT / "tests" / "test_config_checks.py"}
RECORDED = ROOT / "benchmarks" / "results"


def section_numbers(markdown: str) -> set[str]:
    """Numbers of the numbered headings: "4" for '## 4. DSKD-CMA', "5.3" for '### 5.3 Attention-informed band'."""
    return set(re.findall(r"^#{2,6} (\d+(?:\.\d+)*)\.? ", markdown, flags=re.M))


def test_section_numbers_cited_by_the_code_exist() -> None:
    """Every 'docs/methods.md §N' or '§N.M' citation names a numbered heading of docs/methods.md."""
    numbers = section_numbers(METHODS_DOC.read_text(encoding="utf-8"))
    assert {"1.2", "2.1", "4", "5.3", "6.4", "8"} <= numbers
    broken = []
    for path in _linking_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            cited = SECTION_REF.findall(line)
            broken += [f"{path.relative_to(ROOT)}:{number}: §{n}" for n in cited if n not in numbers]
    assert not broken, "citations of sections that docs/methods.md does not have:\n" + "\n".join(broken)


def test_no_references_to_the_brief() -> None:
    """Nothing cites SPEC (SPEC.md, "SPEC §5", ...) or a path under ../shared: neither is in the repository.

    Cite the docs/methods.md section that covers the point instead (`docs/methods.md#53-attention-informed-band`
    or `docs/methods.md §5.3`).
    """
    found = []
    for path in _linking_files():
        if path.resolve() in BRIEF_REF_ALLOWED or "egg-info" in str(path):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if BRIEF_REF.search(line) or (BRIEF_PATH.search(line) and RECORDED not in path.parents):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "references to files outside the repository (cite docs/methods.md):\n" + "\n".join(found)


def test_brief_reference_patterns() -> None:
    """The patterns above catch what they are meant to and leave identifiers alone."""
    for line in ("(SPEC §5)", "see SPEC.md", "Choice (SPEC silent)", 'metavar="SPEC"'):
        assert BRIEF_REF.search(line), line
    for line in ("SPECIAL_IDS = {", "_SPEC = 1", "a spec string", "SPECS"):
        assert not BRIEF_REF.search(line), line
    assert BRIEF_PATH.search("../shared/data") and BRIEF_PATH.search("/work/shared/SPEC.md")
    assert not BRIEF_PATH.search("shared/ memory") and not BRIEF_PATH.search("../shared_vocab")
