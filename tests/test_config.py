"""study.toml: a good study parses into the dataclasses; each malformed one names its key path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from fitness.gates import GateSpec
from genome import Bounds, GenomeSpec
from search.cli import main
from search.config import ExecutionConfig, ModelsConfig, StudyConfig, load_study
from search.errors import StudyConfigError
from tests.checkpoints import TinyFamily

GOOD = """\
[study]
name = "logistics-demo"
seed = 3
output = "runs/logistics"
trials = 120
sampler = "cmaes"
objective = "min"

[models]
base = "family/base"
[models.sources]
shipping = "family/shipping"
refunds = "family/refunds"
catalog = "family/catalog"

[genome]
method = "ties"
layer_granularity = 2
weight = { min = 0.0, max = 1.5, step = 0.05 }
density = { min = 0.1, max = 1.0 }
lambda = { min = 0.5, max = 1.5 }
[genome.fixed]
normalize = true

[[tasks]]
name = "shipping"
search = "data/shipping/search.jsonl"
heldout = "data/shipping/heldout.jsonl"
gates = { min = 0.3, max_regression = 0.5, against = "best" }

[[tasks]]
name = "refunds"
search = "data/refunds/search.jsonl"
weight = 2.0
gates = { max_regression = 0.1, against = "refunds" }

[execution]
backend = "inline"
workers = 2
"""


def write(folder: Path, text: str, name: str = "study.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_good_study_parses_into_dataclasses_with_defaults(tmp_path: Path) -> None:
    config = load_study(write(tmp_path, GOOD))
    assert isinstance(config, StudyConfig)
    assert (config.name, config.seed, config.trials, config.sampler, config.objective) == (
        "logistics-demo", 3, 120, "cmaes", "min",
    )
    assert config.population is None and config.top_k == 5
    assert config.output == tmp_path / "runs" / "logistics"  # relative to the study file
    assert config.storage == f"sqlite:///{tmp_path}/runs/logistics/study.db"
    assert config.models == ModelsConfig(
        base=tmp_path / "family" / "base",
        sources={label: tmp_path / "family" / label for label in ("shipping", "refunds", "catalog")},
    )
    assert list(config.models.sources) == ["shipping", "refunds", "catalog"]  # file order
    assert config.genome == GenomeSpec(
        "ties", layer_granularity=2, weight=Bounds(0.0, 1.5, 0.05), density=Bounds(0.1, 1.0),
        lambda_=Bounds(0.5, 1.5), fixed={"normalize": True},
    )
    shipping, refunds = config.tasks
    assert shipping.search == tmp_path / "data" / "shipping" / "search.jsonl"
    assert shipping.heldout == tmp_path / "data" / "shipping" / "heldout.jsonl"
    assert (shipping.metric, shipping.weight, shipping.heldout_fraction, shipping.limit) == ("exact_match", 1.0, 0.5, None)
    assert shipping.gates == (GateSpec("shipping", min=0.3, max_regression=0.5, against="best"),)
    assert refunds.heldout is None and refunds.weight == 2.0
    assert refunds.gates == (GateSpec("refunds", max_regression=0.1, against="refunds"),)
    assert config.execution == ExecutionConfig(backend="inline", workers=2)
    assert pickle.loads(pickle.dumps(config)) == config  # travels to workers and subprocesses


def test_minimal_study_gets_documented_defaults(tmp_path: Path) -> None:
    text = """\
[models]
base = "b"
sources = { x = "x", y = "y" }
[genome]
method = "linear"
[[tasks]]
name = "t"
search = "t.jsonl"
"""
    folder = tmp_path / "mystudy"
    folder.mkdir()
    config = load_study(write(folder, text))
    assert config.name == "mystudy"  # study.toml is named after its folder
    assert (config.seed, config.trials, config.objective, config.top_k) == (0, 100, "mean", 5)
    assert config.sampler == "cmaes"  # auto: numeric genome, single objective
    assert config.output == folder / "runs" / "mystudy"
    assert config.genome.weight == Bounds(0.0, 1.0) and config.genome.layer_granularity == 1
    assert config.execution == ExecutionConfig()
    assert config.tasks[0].gates == ()


def test_overrides_and_storage_urls(tmp_path: Path) -> None:
    config = load_study(write(tmp_path, GOOD), out=tmp_path / "elsewhere", trials=7)
    assert config.output == tmp_path / "elsewhere" and config.trials == 7
    assert config.storage == f"sqlite:///{tmp_path}/elsewhere/study.db"  # default storage follows --out
    journal = load_study(write(tmp_path, GOOD.replace('objective = "min"', 'storage = "journal:j/log"')))
    assert journal.storage == f"journal:{tmp_path}/j/log"
    pg = load_study(write(tmp_path, GOOD.replace('objective = "min"', 'storage = "postgresql://u@h/db"')))
    assert pg.storage == "postgresql://u@h/db"
    with pytest.raises(StudyConfigError, match=r"--trials: expected an integer >= 0, got -1"):
        load_study(write(tmp_path, GOOD), trials=-1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StudyConfigError, match=rf"^--out: {tmp_path}/afile exists and is not a folder"):
        load_study(write(tmp_path, GOOD), out=tmp_path / "afile")


def test_auto_sampler_follows_genome_and_objective(tmp_path: Path) -> None:
    per_task = GOOD.replace('sampler = "cmaes"\n', "").replace('"min"', '"per_task"')
    assert load_study(write(tmp_path, per_task)).sampler == "nsga2"
    franken = GOOD.replace('sampler = "cmaes"\n', "").split("[genome]")[0] + (
        '[genome]\nmethod = "passthrough"\nfrankenmerge = { pick = "any_index", include_base = true }\n'
        + "[[tasks]]" + GOOD.split("[[tasks]]", 1)[1]
    )
    config = load_study(write(tmp_path, franken))
    assert config.sampler == "tpe" and config.genome.frankenmerge is not None
    assert config.genome.frankenmerge.pick == "any_index" and config.genome.weight is None


def test_a_number_fixes_a_gene(tmp_path: Path) -> None:
    text = GOOD.replace("density = { min = 0.1, max = 1.0 }", "density = 0.4")
    config = load_study(write(tmp_path, text))
    assert config.genome.density is None and config.genome.fixed["density"] == 0.4


MALFORMED: list[tuple[str, str, str]] = [
    # (what to replace in GOOD, replacement, expected message after "study.toml: ")
    ("seed = 3", "seed = 3\nsed = 4", r"study\.sed: unknown key \(did you mean 'seed'\?\)"),
    ("[genome.fixed]", "[genome.fixd]", r"genome\.fixd: unknown key \(did you mean 'fixed'\?\)"),
    ("seed = 3", 'seed = "3"', r"study\.seed: expected an integer, got a string \('3'\)"),
    ("trials = 120", "trials = 1.5", r"study\.trials: expected an integer, got a number \(1\.5\)"),
    ("max = 1.0 }", "max = 1.5 }", r"genome\.density\.max: must be <= 1, got 1\.5"),
    ("lambda = { min = 0.5", "lambda = { min = 2.5", r"genome\.lambda\.min: must be <= max \(1\.5\), got 2\.5"),
    ("step = 0.05", "step = 0.4", r"genome\.weight\.step: max - min \(1\.5\) must be a whole number of steps"),
    ('against = "refunds"', 'against = "refund"',
     r"tasks\[1\]\.gates\.against: unknown source 'refund' \(did you mean 'refunds'\?\) "
     r"\(expected 'best' or a source: shipping, refunds, catalog\)"),
    ('method = "ties"', 'method = "passthrough"\nfrankenmerge = { layers = 4 }',
     r"genome\.weight: method 'passthrough' has no weight"),
    ('sampler = "cmaes"', 'sampler = "bayes"', r"study\.sampler: expected one of auto, cmaes, tpe, gp, nsga2, random, got 'bayes'"),
    ('objective = "min"', 'objective = "per_task"',
     r"study\.sampler: cmaes is single-objective; objective 'per_task' needs one of nsga2, tpe, gp, random"),
    ('objective = "min"', 'storage = "redis://localhost"', r"study\.storage: unknown storage URL 'redis://localhost'"),
    ('name = "refunds"', 'name = "shipping"', r"tasks\[1\]\.name: duplicate task name 'shipping' \(also tasks\[0\]\)"),
    ("weight = 2.0", "weight = inf", r"tasks\[1\]\.weight: expected a finite number, got a number \(inf\)"),
    ("weight = 2.0", "weight = -1.0", r"tasks\[1\]\.weight: must be > 0, got -1"),
    ('search = "data/refunds/search.jsonl"', 'search = "data/refunds/search.jsonl"\nmetric = "exact"',
     r"tasks\[1\]\.metric: unknown metric 'exact' \(did you mean 'exact_match'\?\)"),
    ("gates = { max_regression = 0.1, against = \"refunds\" }", "gates = { against = \"refunds\" }",
     r"tasks\[1\]\.gates: set min, max_regression, or both"),
    ('method = "ties"', 'method = "tiez"', r"genome\.method: expected one of .*ties.*, got 'tiez' \(did you mean 'ties'\?\)"),
    ('method = "ties"', 'method = "linear"', r"genome\.density: method 'linear' has no density"),
    ("normalize = true", "normalize = 1", r"genome\.fixed\.normalize: expected true or false, got 1"),
    ('backend = "inline"', 'backend = "dask"', r"execution\.backend: expected one of ray, inline, got 'dask'"),
    ("workers = 2", "workers = 0", r"execution\.workers: must be >= 1, got 0"),
    ('base = "family/base"\n', "", r"models\.base: required \(a string\) but missing"),
    ("[models]", "[model]", r"model: unknown key \(did you mean 'models'\?\)"),
    ('sampler = "cmaes"', 'samplr = "tpe"', r"study\.samplr: unknown key \(did you mean 'sampler'\?\)"),
    ("weight = { min = 0.0, max = 1.5, step = 0.05 }", 'weight = "high"',
     r"genome\.weight: expected a table, got a string \('high'\)"),
    ("density = { min = 0.1, max = 1.0 }", "density = { min = 0.1, mx = 1.0 }",
     r"genome\.density\.mx: unknown key \(did you mean 'max'\?\)"),
    ('search = "data/refunds/search.jsonl"', 'search = "data/refunds/search.jsonl"\nmetric = "perplexity"',
     r"study\.objective: mode 'min' cannot combine higher-is-better tasks \(shipping\) with lower-is-better"),
    ('sampler = "cmaes"', 'sampler = "tpe"\npopulation = 8',
     r"study\.population: only cmaes and nsga2 use a population, the sampler is 'tpe'"),
    ('objective = "min"', 'storage = "sqlite:///:memory:"', r"study\.storage: an SQLite storage needs a file path"),
    ('objective = "min"', 'top_k = 0', r"study\.top_k: must be >= 1, got 0"),
    ('method = "ties"\nlayer_granularity = 2\nweight = { min = 0.0, max = 1.5, step = 0.05 }\n'
     'density = { min = 0.1, max = 1.0 }\nlambda = { min = 0.5, max = 1.5 }',
     'method = "ties"\nweight = 0.5\ndensity = 0.5',
     r"genome: nothing to search: method 'ties' with no weight, density, lambda or t bounds has no genes"),
    ('catalog = "family/catalog"', '2cat = "family/catalog"',
     r"models\.sources\.2cat: a source label must start with a letter"),
]


@pytest.mark.parametrize(("old", "new", "message"), MALFORMED, ids=[row[2][:40] for row in MALFORMED])
def test_malformed_study_names_the_key_path(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(StudyConfigError, match=rf"^{path}: {message}"):
        load_study(path)


def test_cmaes_refuses_a_categorical_genome(tmp_path: Path) -> None:
    text = GOOD.split("[genome]")[0] + (
        '[genome]\nmethod = "passthrough"\nfrankenmerge = { layers = 4 }\n' + "[[tasks]]" + GOOD.split("[[tasks]]", 1)[1]
    )
    path = write(tmp_path, text)
    with pytest.raises(StudyConfigError, match=r"study\.sampler: cmaes cannot search the categorical genes .* use tpe, gp, nsga2 or random"):
        load_study(path)


def test_missing_file_and_toml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(StudyConfigError, match=rf"^{tmp_path}/nope\.toml: study file not found$"):
        load_study(tmp_path / "nope.toml")
    path = write(tmp_path, GOOD.replace("seed = 3", "seed = = 3"))
    with pytest.raises(StudyConfigError, match=rf"^{path}: TOML syntax error: .*\(at line 3, column \d+\)"):
        load_study(path)


# -- search validate ------------------------------------------------------------------


def family_study(folder: Path, family: TinyFamily, **replace: str) -> Path:
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for task in ("alpha", "beta"):
        rows = [{"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(6)]
        (data / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    sources = "\n".join(f'{name} = "{path}"' for name, path in zip(("a", "b", "c"), family.sources, strict=True))
    text = f"""\
[study]
name = "tiny"
sampler = "tpe"
[models]
base = "{family.base}"
[models.sources]
{sources}
[genome]
method = "dare_ties"
layer_granularity = 2
per_role = true
density = {{ min = 0.2, max = 0.9 }}
[[tasks]]
name = "alpha"
search = "data/alpha.jsonl"
gates = {{ min = 0.1 }}
[[tasks]]
name = "beta"
search = "data/beta.jsonl"
heldout_fraction = 0.25
gates = {{ max_regression = 0.2, against = "b" }}
[execution]
backend = "inline"
"""
    for old, new in replace.items():
        text = text.replace(old, new)
    return write(folder, text)


def test_validate_prints_a_summary_of_a_good_study(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    path = family_study(tmp_path, llama_family)
    assert main(["validate", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "base: " in out and "(4 layers, float32)" in out
    assert "2 layer group(s): [0,2) [2,4)" in out
    # 2 groups x 3 roles x (weight, density) x 3 sources
    assert "36 genes:" in out
    assert "g1.mlp.density.c" in out and "g0.attention.weight.a" in out
    assert "sampler: tpe" in out and "trials 100" in out
    assert f"storage: sqlite:///{tmp_path}/out/study.db" in out
    assert "gates (2): alpha.min, beta.max_regression" in out
    assert "at most 0.2 below b" in out


def test_validate_fails_with_exit_2_and_the_reason(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = family_study(tmp_path, llama_family, **{'gates = { min = 0.1 }': 'gates = { min = 0.1, agianst = "b" }'})
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}: tasks[0].gates.agianst: unknown key (did you mean 'against'?)")

    missing_data = family_study(tmp_path, llama_family, **{"data/beta.jsonl": "data/gamma.jsonl"})
    assert main(["validate", str(missing_data)]) == 2
    err = capsys.readouterr().err
    assert f"tasks[1].search: data file {tmp_path}/data/gamma.jsonl does not exist" in err

    missing_source = family_study(tmp_path, llama_family, **{str(llama_family.sources[1]): str(tmp_path / "gone")})
    assert main(["validate", str(missing_source)]) == 2
    assert f"checkpoint folder {tmp_path / 'gone'} does not exist" in capsys.readouterr().err


def test_validate_checks_the_genome_against_the_checkpoints_layers(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    franken = 'method = "passthrough"\nfrankenmerge = { layers = 6 }'
    path = family_study(tmp_path, llama_family, **{
        'method = "dare_ties"': franken, "per_role = true\n": "", "layer_granularity = 2\n": "",
        "density = { min = 0.2, max = 0.9 }\n": "",
    })
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f'error: {path}: genome.frankenmerge.layers: 6 output layers with pick = "same_index" need 6 layers, '
        "the checkpoints have 4"
    )


def test_shipped_study_files_load(repo_root: Path) -> None:
    """Every study file in studies/ passes validation (paths need not exist yet)."""
    files = sorted(repo_root.glob("studies/**/*.toml"))
    assert files, "no study files under studies/"
    for path in files:
        config = load_study(path)
        assert config.path == path.resolve() and config.tasks


def test_validate_says_which_sampler_auto_picks_and_why(
    tmp_path: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {  # the study file's edits -> what auto picks and the start of its reason
        "cmaes: numeric genes, one objective": {'sampler = "tpe"': 'sampler = "auto"'},
        "nsga2: objective per_task is one objective per task": {'sampler = "tpe"': 'sampler = "auto"\nobjective = "per_task"'},
        "tpe: categorical genes (frankenmerge layer picks)": {
            'sampler = "tpe"': 'sampler = "auto"', 'method = "dare_ties"': 'method = "passthrough"\nfrankenmerge = { layers = 4 }',
            "per_role = true\n": "", "layer_granularity = 2\n": "", "density = { min = 0.2, max = 0.9 }\n": "",
        },
    }
    for expected, edits in cases.items():
        path = family_study(tmp_path, llama_family, **edits)
        assert main(["validate", str(path), "--out", str(tmp_path / "out")]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sampler: ")]
        picked = expected.split(":")[0]
        assert len(lines) == 1 and lines[0].startswith(f"sampler: {picked} ") and f"; auto picks {expected}" in lines[0], lines
    # A study that names its sampler still hears what auto would pick.
    path = family_study(tmp_path, llama_family)
    assert main(["validate", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "sampler: tpe (population: Optuna's default); auto picks cmaes: numeric genes" in capsys.readouterr().out
