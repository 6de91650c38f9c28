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
