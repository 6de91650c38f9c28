"""The README is the front door: its study.toml reference and CLI reference stay complete."""

import re
from pathlib import Path

import pytest

from search import config
from search.commands import SUMMARIES

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"### `{title}`")
    end = text.find("\n### `", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize(
    ("table", "keys"),
    [
        ("[study]", config.STUDY_KEYS),
        ("[models]", config.MODELS_KEYS),
        ("[genome]", config.GENOME_KEYS + config.FRANKEN_KEYS),
        ("[[tasks]]", config.TASK_KEYS + ("min", "max_regression", "against")),
        ("[execution]", config.EXECUTION_KEYS),
    ],
)
def test_every_study_key_has_a_row_with_its_default(table: str, keys: tuple[str, ...]) -> None:
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", _section(table), re.MULTILINE)}
    missing = [k for k in keys if k not in rows]
    assert not missing, f"README section {table} has no row for {missing}"


def test_every_command_is_in_the_cli_reference() -> None:
    text = README.read_text(encoding="utf-8")
    cli = text[text.index("## CLI reference"):text.index("## Exporting to mergekit")]
    missing = [name for name in SUMMARIES if f"`search {name} " not in cli]
    assert not missing, f"README CLI reference lacks {missing}"


# -- docs point only inside the repository ----------------------------------------------

REPO = README.parent
_NOT_DOCS = {"__pycache__", "runs", "build", "dist", "family"}  # build outputs, study outputs
_LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown links and images
_UP_PATH = re.compile(r"(?:^|[\s`(\"'])((?:\.\./)+[\w./-]*)", re.MULTILINE)  # ../x in text or code
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s`(\"'])(/(?:[\w.-]+/)+[\w.-]*)", re.MULTILINE)  # /a/b, not URLs


def _docs() -> list[Path]:
    docs = []
    for path in sorted(REPO.rglob("*.md")):
        parts = path.relative_to(REPO).parts[:-1]
        if not any(p.startswith(".") or p in _NOT_DOCS or p.endswith(".egg-info") for p in parts):
            docs.append(path)
    return docs


def _outside_pointers_in(text: str, doc: Path) -> list[str]:
    """Links and paths in ``text`` (of ``doc``) that leave the repository or name nothing in it."""
    found = []
    for match in _LINK.finditer(text):
        target = match.group(1).split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor or a URL
            continue
        resolved = (doc.parent / target).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            found.append(f"link {match.group(1)}")
    for match in _UP_PATH.finditer(text):
        resolved = (doc.parent / match.group(1)).resolve()
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            found.append(f"path {match.group(1)}")
    found += [f"absolute path {match.group(1)}" for match in _ABSOLUTE_PATH.finditer(text)]
    return found


def test_docs_point_only_inside_the_repository() -> None:
    docs = _docs()
    assert REPO / "README.md" in docs and REPO / "docs" / "ARCHITECTURE.md" in docs
    outside = {str(doc.relative_to(REPO)): _outside_pointers_in(doc.read_text(encoding="utf-8"), doc)
               for doc in docs}
    assert not {doc: found for doc, found in outside.items() if found}


def test_the_pointer_check_catches_paths_outside() -> None:
    doc = REPO / "docs" / "x.md"  # never written: only its folder matters
    text = ("See `../shared/DESIGN.md`, `/work/shared/notes.md`, [a](../../elsewhere.md), "
            "[b](missing.md), [c](https://example.com/a/b), [d](../README.md#quick-start).")
    pointers = _outside_pointers_in(text, doc)
    assert pointers == ["link ../../elsewhere.md", "link missing.md", "path ../shared/DESIGN.md",
                        "path ../../elsewhere.md", "absolute path /work/shared/notes.md"]


# -- links to a heading land on one --------------------------------------------------------

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)  # code blocks: their "#" lines are no headings
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but "-" and "_" dropped, spaces -> "-"."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    """Every anchor ``doc``'s headings give, a repeated one as GitHub numbers it (``x``, ``x-1``, ...)."""
    anchors: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", doc.read_text(encoding="utf-8"))):
        slug, n = _slug(heading), 0
        while (slug if n == 0 else f"{slug}-{n}") in anchors:
            n += 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _dangling_anchors_in(text: str, doc: Path) -> list[str]:
    """Links of ``text`` (in ``doc``) to ``#anchor`` in a markdown file of the repository that has no such heading."""
    found = []
    for match in _LINK.finditer(text):
        target, _, anchor = match.group(1).partition("#")
        if not anchor or re.match(r"^[a-z][a-z0-9+.-]*:", target) or not (target or doc.name).endswith(".md"):
            continue
        linked = (doc.parent / target).resolve() if target else doc
        if linked.exists() and anchor not in _anchors(linked):
            found.append(match.group(1))
    return found


def test_every_link_to_a_heading_lands_on_one() -> None:
    dangling = {str(doc.relative_to(REPO)): _dangling_anchors_in(doc.read_text(encoding="utf-8"), doc)
                for doc in _docs()}
    assert not {doc: found for doc, found in dangling.items() if found}


def test_the_anchor_check_knows_github_slugs(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    doc.write_text("# Top\n### `[study]` (optional table)\n## Merging at 1.1B\n## Top\n"
                   "```bash\n# not a heading\n```\n", encoding="utf-8")
    assert _anchors(doc) == {"top", "study-optional-table", "merging-at-11b", "top-1"}
    text = "[a](#top-1) [b](#merging-at-11b) [c](#not-a-heading) [d](a.md#top-2) [e](https://x.org/#y)"
    assert _dangling_anchors_in(text, doc) == ["#not-a-heading", "a.md#top-2"]


def test_the_performance_section_points_to_its_history() -> None:
    """The README keeps the current figures; every earlier run lives in docs/PERFORMANCE_HISTORY.md."""
    text = README.read_text(encoding="utf-8")
    performance = text[text.index("\n## Performance\n"):text.index("\n## CLI reference\n")]
    assert "](docs/PERFORMANCE_HISTORY.md)" in performance
    history = (REPO / "docs" / "PERFORMANCE_HISTORY.md").read_text(encoding="utf-8")
    assert "](../README.md#performance)" in history
