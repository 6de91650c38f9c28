"""Checkpoint code (``auto_map``) runs only with ``models.trust_remote_code = true``, never after a prompt.

The checkpoints are real folders: the tiny Llama family re-declared as a custom
architecture (``model_type = "tiny-custom"``) whose config, model and tokenizer classes
live in Python files next to the weights, each writing a marker file when imported.
The CLI runs in a subprocess with stdin closed, and under a pseudo-terminal, where
transformers would ask ``[y/N]`` if the flag did not reach it.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.checkpoints import make_family
from tests.studies import write_study

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 600  # a prompt waiting for an answer would hit this, not a slow machine

MODELING = '''\
from pathlib import Path

Path({marker!r}).write_text("model code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''

TOKENIZATION = '''\
from pathlib import Path

Path({marker!r}).write_text("tokenizer code ran")

from transformers import PreTrainedTokenizerFast


class TinyCustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def _custom_family(root: Path, *, model: bool = True, tokenizer: bool = True) -> tuple[object, dict[str, Path]]:
    """The tiny family with ``auto_map`` code in config.json and/or tokenizer_config.json."""
    family = make_family(root, n_sources=2)
    markers = {"model": root / "model-code-ran", "tokenizer": root / "tokenizer-code-ran"}
    for folder in (family.base, *family.sources):
        if model:
            (folder / "modeling_tiny.py").write_text(MODELING.format(marker=str(markers["model"])))
            config = json.loads((folder / "config.json").read_text())
            config.update(
                model_type="tiny-custom",
                architectures=["TinyCustomForCausalLM"],
                auto_map={
                    "AutoConfig": "modeling_tiny.TinyCustomConfig",
                    "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
                },
            )
            (folder / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer:
            (folder / "tokenization_tiny.py").write_text(TOKENIZATION.format(marker=str(markers["tokenizer"])))
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyCustomTokenizerFast"]}
            config["tokenizer_class"] = "TinyCustomTokenizerFast"
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return family, markers


def _study(folder: Path, family: object, *, trust: bool) -> Path:
    path = write_study(folder, family, trials=0, metric="loglik")  # type: ignore[arg-type]
    text = path.read_text().replace("[models.sources]", f"trust_remote_code = {'true' if trust else 'false'}\n\n[models.sources]")
    path.write_text(text)
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf-modules")  # where transformers copies checkpoint code
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _closed_stdin(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def _under_pty(args: list[str], env: dict[str, str], *, answer: bytes | None = None) -> tuple[int, str]:
    """Run with stdin/stdout/stderr on a pseudo-terminal; ``answer`` is typed after a ``[y/N]`` prompt."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    answered = False
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                raise AssertionError(f"no exit within {HANG_GUARD_S} s (waiting at a prompt?): {out[-2000:]!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if answer is not None and not answered and b"[y/N]" in out:
                os.write(master, answer)
                answered = True
        proc.wait(timeout=60)
    finally:
        os.close(master)
    return proc.returncode, out.decode(errors="replace")


def test_the_pty_harness_sees_the_prompt_transformers_asks_without_the_flag(tmp_path: Path) -> None:
    """Control: with the flag left unset, transformers does ask on a terminal (so the tests below can fail)."""
    family, markers = _custom_family(tmp_path / "family", tokenizer=False)
    code = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(family.base)!r})"  # type: ignore[attr-defined]
    rc, out = _under_pty(["-c", code], _env(tmp_path), answer=b"n\n")
    assert "[y/N]" in out
    assert rc != 0 and not markers["model"].exists()


def test_auto_map_is_refused_without_trust_and_its_code_never_runs(tmp_path: Path) -> None:
    family, markers = _custom_family(tmp_path / "family")
    path = _study(tmp_path, family, trust=False)
    env = _env(tmp_path)
    refusal = (
        f"error: {path}: models.trust_remote_code: models.base ({family.base}) ships its own Python code "  # type: ignore[attr-defined]
        "(config.json auto_map: AutoConfig -> modeling_tiny.TinyCustomConfig, AutoModelForCausalLM -> "
        "modeling_tiny.TinyCustomForCausalLM; tokenizer_config.json auto_map: AutoTokenizer -> "
        "tokenization_tiny.TinyCustomTokenizerFast), which runs only with models.trust_remote_code = true"
    )
    done = _closed_stdin(["-m", "search.cli", "validate", str(path)], env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(refusal), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # `start` refuses through the same check (it runs `validate`'s check_study first); once, on
    # a terminal, where transformers would ask [y/N] if it got that far. The pty carries
    # stdout and stderr together: the refusal must be all there is.
    rc, out = _under_pty(["-m", "search.cli", "start", str(path), "--quiet"], env)
    assert rc == 2 and "[y/N]" not in out
    assert out.strip().startswith(refusal) and len(out.strip().splitlines()) == 1, out
    assert not markers["model"].exists() and not markers["tokenizer"].exists()
    assert not (tmp_path / "out").exists()  # refused before any storage


def test_a_tokenizer_auto_map_alone_is_refused(tmp_path: Path) -> None:
    from search.commands.validate import check_study
    from search.config import load_study
    from search.errors import StudyConfigError

    family, markers = _custom_family(tmp_path / "family", model=False)
    path = _study(tmp_path, family, trust=False)
    with pytest.raises(StudyConfigError, match=r"models\.trust_remote_code: models\.base .*\(tokenizer_config\.json "
                                               r"auto_map: AutoTokenizer -> tokenization_tiny\.TinyCustomTokenizerFast\)"):
        check_study(load_study(path))
    assert not markers["tokenizer"].exists()


def test_with_trust_custom_code_loads_without_a_prompt(tmp_path: Path) -> None:
    """One run on a terminal: had the flag missed any load, transformers would print [y/N]
    there and wait (then fail); with stdin closed it would print it and fail at once, so a
    second run with stdin closed would add nothing."""
    family, markers = _custom_family(tmp_path / "family")
    path = _study(tmp_path, family, trust=True)
    rc, out = _under_pty(["-m", "search.cli", "start", str(path), "--quiet"], _env(tmp_path))
    assert rc == 0, out[-3000:]
    assert "[y/N]" not in out
    assert markers["model"].read_text() == "model code ran"
    assert markers["tokenizer"].read_text() == "tokenizer code ran"
    # the baselines were scored on the live custom model
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.state for t in study.get_trials()].count(TrialState.COMPLETE) >= 2
