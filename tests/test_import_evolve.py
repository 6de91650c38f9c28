"""`search import-evolve`: a mergekit-evolve config (mergekit 0.1.5's format) becomes a study
file that validates and runs; what it cannot express is listed with the reason; public
benchmarks are warned about; it never replaces a file it did not write.

The representative config evolves the shipped demo family on the lm-eval task YAMLs of
studies/logistics_lmeval/tasks (real lm-eval, skipped when not installed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import main
from search.commands.import_evolve import SIGNATURE, convert_file
from search.config import load_study

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
FAMILY = REPO / "studies" / "logistics" / "family"
TASKS = REPO / "studies" / "logistics_lmeval" / "tasks"

REPRESENTATIVE = f"""\
genome:
  models:
    - {FAMILY / "shipping"}
    - {FAMILY / "refunds"}
    - {FAMILY / "catalog"}
  merge_method: ties
  base_model: {FAMILY / "base"}
  tokenizer_source: base
  layer_granularity: 2
  normalize: true
  allow_negative_weights: false
  filters: ["self_attn", "mlp"]
tasks:
  - name: logistics_refunds_mc
    weight: 1.0
    metric: "acc,none"
  - name: logistics_shipping_gen
    weight: 2.0
    metric: "exact_match,strip"
  - logistics_catalog_ll
limit: 8
num_fewshot: 0
shuffle: true
apply_chat_template: false
fewshot_as_multiturn: false
"""

needs_lm_eval = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import lm_eval"], capture_output=True).returncode != 0,
    reason="lm-eval is not installed (pip install -e '.[lm-eval]')",
)


def test_the_representative_config_maps_key_by_key(tmp_path: Path) -> None:
    evolve = tmp_path / "evolve.yml"
    evolve.write_text(REPRESENTATIVE)
    conversion = convert_file(evolve, tmp_path / "study.toml", task_search_path=TASKS, trials=3)
    assert conversion.not_expressed == [] and conversion.warnings == []
    study = tomllib.loads(conversion.text)
    assert study["genome"] == {
        "method": "ties", "layer_granularity": 2, "per_role": True, "weight": {"min": 0.0, "max": 1.0},
        "density": {"min": 0.0, "max": 1.0}, "fixed": {"normalize": True},
    }
    assert study["study"]["trials"] == 3 and study["study"]["sampler"] == "cmaes"
    assert study["study"]["objective"] == "mean"
    assert [(t["lm_eval"], t["lm_eval_metric"], t["weight"], t["limit"], t["lm_eval_num_fewshot"], t["chat_template"])
            for t in study["tasks"]] == [
        ("logistics_refunds_mc", "acc,none", 1.0, 8, 0, False),
        ("logistics_shipping_gen", "exact_match,strip", 2.0, 8, 0, False),
        ("logistics_catalog_ll", "acc,none", 1.0, 8, 0, False),
    ]
    config = load_study(_written(tmp_path, conversion.text))
    assert config.models.base == FAMILY / "base"
    assert list(config.models.sources.values()) == [FAMILY / "shipping", FAMILY / "refunds", FAMILY / "catalog"]
    assert all(t.lm_eval is not None and t.lm_eval.include == TASKS for t in config.tasks)


def _written(folder: Path, text: str) -> Path:
    path = folder / "study.toml"
    path.write_text(text)
    return path


def test_what_cannot_be_expressed_is_listed_and_benchmarks_are_warned_about(tmp_path: Path) -> None:
    evolve = tmp_path / "evolve.yml"
    evolve.write_text("""\
genome:
  models: [org/model-a, org/model-b+org/lora, org/model-c]
  merge_method: slerp
  smooth: true
  tokenizer_source: union
  layer_granularity: 4
population: 10
tasks:
  - gsm8k
  - {name: arc_challenge_train, weight: 0.5}
  - {name: mmlu, weight: 0}
limit: 50
random_init: true
""")
    conversion = convert_file(evolve, tmp_path / "study.toml")
    listed = "\n".join(conversion.not_expressed)
    for key in ("population: not a mergekit-evolve 0.1.5 config key", "genome.models[0]: 'org/model-a' is not a local folder",
                "genome.models[1]: LoRA 'org/lora'", "slerp over 3 models", "genome.tokenizer_source: 'union'",
                "genome.smooth:", "tasks[2].weight: 0: study weights are > 0", "shuffle: false with limit 50",
                "random_init:"):
        assert key in listed, key
    assert len(conversion.warnings) == 1 and "'gsm8k' is a public benchmark" in conversion.warnings[0]
    study = tomllib.loads(conversion.text)  # the header lists the same, as comments
    assert [t["lm_eval"] for t in study["tasks"]] == ["gsm8k", "arc_challenge_train"]
    assert study["genome"]["t"] == {"min": 0.0, "max": 1.0} and "weight" not in study["genome"]
    assert study["models"]["base"] == "org/model-a" and list(study["models"]["sources"].values()) == ["org/model-b"]
    for item in conversion.not_expressed:
        assert f"#   - {item}" in conversion.text
    assert "# WARNING: lm-eval task 'gsm8k' is a public benchmark" in conversion.text


def test_it_never_replaces_a_file_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evolve = tmp_path / "evolve.yml"
    evolve.write_text(REPRESENTATIVE)
    mine = tmp_path / "study.toml"
    mine.write_text("[study]\n# my own notes\n")
    assert main(["import-evolve", str(evolve), "-o", str(mine)]) == 2
    assert "was not written by mergesearch" in capsys.readouterr().err
    assert mine.read_text() == "[study]\n# my own notes\n"
    ours = tmp_path / "converted.toml"
    assert main(["import-evolve", str(evolve), "-o", str(ours)]) == 0
    assert main(["import-evolve", str(evolve), "-o", str(ours), "--trials", "7"]) == 0  # its own file: replaced
    assert ours.read_text().startswith(SIGNATURE) and "trials = 7 " in ours.read_text()


def test_a_bad_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evolve = tmp_path / "evolve.yml"
    evolve.write_text(REPRESENTATIVE.replace("merge_method: ties", "merge_method: della"))
    assert main(["import-evolve", str(evolve), "-o", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {evolve}: genome.merge_method: expected one of linear, task_arithmetic, ties,")


@needs_lm_eval
@pytest.mark.slow
def test_the_converted_study_validates_and_runs(tmp_path: Path) -> None:
    evolve = tmp_path / "evolve.yml"
    evolve.write_text(REPRESENTATIVE)
    study = tmp_path / "study.toml"
    assert main(["import-evolve", str(evolve), "-o", str(study), "--task-search-path", str(TASKS),
                 "--trials", "1"]) == 0
    assert main(["validate", str(study)]) == 0
    assert main(["start", str(study)]) == 0
    from search.storage import load_existing_study

    config = load_study(study)
    trials = load_existing_study(config.name, config.storage).get_trials()
    search = [t for t in trials if t.user_attrs.get("kind") == "search"]
    assert len(search) == 1 and set(search[0].user_attrs["scores_search"]) == {
        "logistics_refunds_mc", "logistics_shipping_gen", "logistics_catalog_ll"}
