"""Output files and folders (``merges.output``): never over what the tool did not write.

Real files, the real CLI (``search merge``, ``search export``, ``search report``), real killed
processes and, where this machine lets the test mount one, a real full disk (a small tmpfs).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merges.checkpoint import open_checkpoint
from merges.mergekit_yaml import recipe_to_mergekit
from merges.output import MARKER, OutputError, check_output_folder, output_folder
from merges.recipe import Recipe
from search.cli import main
from tests.checkpoints import TinyFamily
from tests.studies import run, write_study

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def _dead_pid() -> int:
    """The PID of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


@pytest.fixture
def config(llama_family: TinyFamily, tmp_path: Path) -> Path:
    """A mergekit YAML of a linear merge of the tiny family's sources."""
    recipe = Recipe.uniform("linear", str(llama_family.base), [str(s) for s in llama_family.sources], 4,
                            tensor_params={"weight": [0.5, 0.3, 0.2]})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_mergekit(recipe, open_checkpoint(llama_family.base).layout))
    return path


@pytest.fixture(scope="module")
def study(llama_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny study; its study.toml (the study folder is its parent, output ``out/``)."""
    path = write_study(tmp_path_factory.mktemp("study"), llama_family, trials=2)
    run(path)
    return path


# -- search merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_folder_holding_a_user_file_is_refused_and_kept(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep\n")
    assert main(["merge", str(config), str(folder), *flags]) == 2
    line = _one_error_line(capsys)
    assert str(folder) in line and "notes.txt" in line and "not written by mergesearch" in line
    assert _tree(folder) == {"notes.txt": b"keep\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "recipe.yaml"]  # no temp left


def test_an_empty_folder_is_filled(config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    assert main(["merge", str(config), str(folder)]) == 0
    assert (folder / "model.safetensors").is_file() and (folder / MARKER).is_file()


@pytest.mark.parametrize("which", ["a source", "the base", "the family folder holding them"])
@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_sources_the_base_and_their_parents_are_never_outputs(
    config: Path, llama_family: TinyFamily, capsys: pytest.CaptureFixture[str], which: str,
    flags: list[str],
) -> None:
    target = {"a source": llama_family.sources[1], "the base": llama_family.base,
              "the family folder holding them": llama_family.base.parent}[which]
    before = _tree(llama_family.base.parent)
    assert main(["merge", str(config), str(target), *flags]) == 2
    line = _one_error_line(capsys)
    assert str(target) in line and "checkpoint" in line
    assert _tree(llama_family.base.parent) == before


def test_overwrite_replaces_only_an_unchanged_previous_output(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--seed", "1"]) == 0
    first = _tree(out)
    assert main(["merge", str(config), str(out)]) == 2
    assert "pass --overwrite" in _one_error_line(capsys)
    assert _tree(out) == first

    (out / "config.json").write_text((out / "config.json").read_text() + "\n")  # a hand edit
    assert main(["merge", str(config), str(out), "--overwrite"]) == 2
    assert "config.json (changed since mergesearch wrote it)" in _one_error_line(capsys)

    assert main(["merge", str(config), str(out), "--seed", "1"]) == 2  # edited: still refused
    assert "did not write" in _one_error_line(capsys)
    (out / "config.json").unlink()
    assert main(["merge", str(config), str(out), "--overwrite"]) == 0  # a missing file is fine
    again = _tree(out)
    assert set(again) == set(first) and again["model.safetensors"] == first["model.safetensors"]

    (out / "notes.txt").write_text("mine\n")
    assert main(["merge", str(config), str(out), "--overwrite"]) == 2
    assert "notes.txt" in _one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.yaml"]


# -- temp folders of killed runs -----------------------------------------------------------------

_KILLED_RUN = """
import os, signal, sys
from merges.output import output_folder
with output_folder(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # a live run: waits until the test lets it go
"""


@contextlib.contextmanager
def _run_in_output(out: Path, how: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A real process that starts writing ``out`` and is killed (``kill``) or stays (``live``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(out), how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        temp = Path(proc.stdout.readline().strip())
        if how == "kill":
            assert proc.wait(timeout=120) == -signal.SIGKILL
        yield proc, temp
    finally:
        proc.kill()
        proc.wait(timeout=120)


def test_a_killed_runs_temp_folder_is_cleaned_by_the_next_run(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with _run_in_output(out, "kill") as (proc, temp):
        assert temp == tmp_path / f".merged.tmp-{proc.pid}" and (temp / MARKER).is_file()
    assert main(["merge", str(config), str(out)]) == 0
    assert not temp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.yaml"]


def test_a_live_runs_temp_folder_and_an_unmarked_lookalike_are_left_alone(
    config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    lookalike = tmp_path / f".merged.tmp-{_dead_pid()}"  # a dead PID, but no marker: not ours
    lookalike.mkdir()
    (lookalike / "thesis.tex").write_text("mine\n")
    with _run_in_output(out, "live") as (_proc, temp):
        assert main(["merge", str(config), str(out)]) == 0
        assert (temp / "model.safetensors").read_bytes() == b"half a checkpoint"
    assert (lookalike / "thesis.tex").read_text() == "mine\n"
    # Killed now: the next run on the same output removes its temp folder, and only that.
    assert main(["merge", str(config), str(out), "--overwrite"]) == 0
    assert not temp.exists() and (lookalike / "thesis.tex").exists()


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(config: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out)]) == 0
    first = _tree(out)
    aside = tmp_path / f".merged.old-{_dead_pid()}"
    os.replace(out, aside)  # killed between its two renames: the old output aside, the new one not in
    assert main(["merge", str(config), str(out)]) == 2
    assert "pass --overwrite" in _one_error_line(capsys)
    assert _tree(out) == first and not aside.exists()


def test_a_killed_exports_temp_file_is_cleaned_and_a_lookalike_kept(study: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    killed = tmp_path / f"recipe.yaml.tmp-{_dead_pid()}"
    killed.write_text("# mergesearch export\n# study: ... (cut off)")  # what a killed export leaves
    lookalike = tmp_path / f"recipe.yaml.tmp-{_dead_pid()}"
    lookalike.write_text("models: []\n")  # same name pattern, not ours
    assert main(["export", str(study), "-o", str(recipe)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["recipe.yaml", lookalike.name])


# -- search export --materialize and -o, search report -o ---------------------------------------


def test_materialize_into_the_study_folder_is_refused_and_deletes_nothing(
    study: Path, llama_family: TinyFamily, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = study.parent
    before = _tree(folder)
    monkeypatch.chdir(folder)
    for flags in ([], ["--overwrite"]):
        assert main(["export", "study.toml", "-o", "recipe.yaml", "--materialize", ".", *flags]) == 2
        line = _one_error_line(capsys)
        assert str(folder) in line and "study folder" in line
    assert _tree(folder) == before  # study.toml, data, out/ kept; no recipe.yaml written


@pytest.mark.parametrize("which", ["study parent", "study output", "source", "base"])
def test_materialize_never_writes_over_what_the_study_uses(
    study: Path, llama_family: TinyFamily, tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    target = {"study parent": study.parent.parent, "study output": study.parent / "out",
              "source": llama_family.sources[0], "base": llama_family.base}[which]
    recipe = tmp_path / "recipe.yaml"
    before = _tree(study.parent), _tree(llama_family.base.parent)
    assert main(["export", str(study), "-o", str(recipe), "--materialize", str(target), "--overwrite"]) == 2
    assert str(target) in _one_error_line(capsys)
    assert (_tree(study.parent), _tree(llama_family.base.parent)) == before
    assert not recipe.exists()


def test_read_only_commands_leave_the_study_folder_as_found(study: Path, tmp_path: Path) -> None:
    """No SQLite ``-wal``/``-shm`` files linger after a command (an open pooled connection keeps them
    until garbage collection, which is off here so a leak cannot hide), and no byte changes."""
    output = study.parent / "out"
    before = _tree(study.parent)
    assert not {"out/study.db-wal", "out/study.db-shm"} & set(before)  # `search start` closed its connections
    gc.disable()
    try:
        for command in (["export", str(study), "-o", str(tmp_path / "recipe.yaml")],
                        ["report", str(study), "-o", str(tmp_path / "report.html")],
                        ["status", str(study)]):
            assert main(command) == 0, command
            assert sorted(p.name for p in output.iterdir() if p.name.startswith("study.db")) == [
                "study.db", "study.db.writer.lock"], command
    finally:
        gc.enable()
    assert _tree(study.parent) == before


def test_export_files_and_folders_are_replaced_only_when_ours(
    study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, merged = tmp_path / "recipe.yaml", tmp_path / "merged"
    assert main(["export", str(study), "-o", str(recipe), "--materialize", str(merged)]) == 0
    assert (merged / MARKER).is_file()
    assert main(["export", str(study), "-o", str(recipe), "--materialize", str(merged)]) == 2
    assert "pass --overwrite" in _one_error_line(capsys)
    assert main(["export", str(study), "-o", str(recipe), "--materialize", str(merged), "--overwrite"]) == 0
    assert main(["export", str(study), "-o", str(recipe)]) == 0  # its own YAML: replaced
    notes = tmp_path / "notes.yaml"
    notes.write_text("models: []\n")
    assert main(["export", str(study), "-o", str(notes)]) == 2
    assert "not written by mergesearch" in _one_error_line(capsys)
    assert main(["report", str(study), "-o", str(notes)]) == 2
    assert "not written by mergesearch" in _one_error_line(capsys)
    assert notes.read_text() == "models: []\n"
    inside = merged / "recipe.yaml"
    assert main(["export", str(study), "-o", str(inside), "--materialize", str(merged), "--overwrite"]) == 2
    assert "inside --materialize" in _one_error_line(capsys)
    assert not inside.exists()


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (smaller than one tiny checkpoint); skips where it cannot be mounted."""
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=60)


def test_a_full_disk_is_one_line_and_leaves_nothing_that_looks_complete(
    config: Path, study: Path, full_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(config), str(full_disk)]) == 2
    assert _one_error_line(capsys) == f"error: {full_disk}: is a mount point; give a folder inside it"
    out = full_disk / "merged"
    assert main(["merge", str(config), str(out)]) == 2
    assert _one_error_line(capsys) == f"error: could not write {out}: No space left on device"
    assert list(full_disk.iterdir()) == []  # no folder, no temp
    materialized = full_disk / "materialized"
    assert main(["export", str(study), "-o", str(tmp_path / "exported.yaml"), "--materialize", str(materialized)]) == 2
    assert _one_error_line(capsys) == f"error: could not write {materialized}: No space left on device"
    assert list(full_disk.iterdir()) == []

    filler = full_disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as handle:
        while True:  # fill the disk to its last block
            handle.write(b"\0" * 4096)
            handle.flush()
    for command, name in (("export", "recipe.yaml"), ("report", "report.html")):
        target = full_disk / name
        assert main([command, str(study), "-o", str(target)]) == 2
        assert _one_error_line(capsys) == f"error: could not write {target}: No space left on device"
        assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# -- the guard itself ----------------------------------------------------------------------------

_names = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters="._-"),
                 min_size=1, max_size=12).filter(lambda n: n not in (".", "..", MARKER))
_files = st.dictionaries(_names, st.binary(max_size=64), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ours=_files, foreign=_names, content=st.binary(max_size=64), how=st.sampled_from(
    ["new file", "new folder", "grown file", "file made a folder", "symlink", "no marker"]))
def test_the_guard_never_accepts_a_folder_holding_a_file_it_did_not_write(
    ours: dict[str, bytes], foreign: str, content: bytes, how: str
) -> None:
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        with output_folder(out) as tmp:
            for name, data in ours.items():
                (tmp / name).write_bytes(data)
        assert check_output_folder(out, overwrite=True) == out  # exactly its own output: accepted
        with pytest.raises(OutputError, match="pass --overwrite"):
            check_output_folder(out)
        mine = next(iter(ours))
        while foreign in ours:
            foreign += "x"
        if how == "new file":
            (out / foreign).write_bytes(content)
        elif how == "new folder":
            (out / foreign).mkdir()
        elif how == "grown file":
            (out / mine).write_bytes(ours[mine] + b"+" + content)
        elif how == "file made a folder":
            (out / mine).unlink()
            (out / mine).mkdir()
        elif how == "symlink":
            (out / mine).unlink()
            (out / mine).symlink_to(Path(root))
        else:
            (out / MARKER).unlink()
        after = sorted(p.name for p in out.iterdir())
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="not written by mergesearch|did not write"):
                check_output_folder(out, overwrite=overwrite)
        assert sorted(p.name for p in out.iterdir()) == after
