"""Task slices: local data files -> disjoint search / held-out splits, tokenised once.

``load_task(spec, tokenizer)`` reads the files named by a :class:`TaskSpec` with
``datasets`` (local jsonl / json / csv / parquet only; a folder means every file of one
format in it), splits them, checks the splits share no prompt, and tokenises every
example once into right-padded CPU batches that the scorer reuses for every trial.

How a prompt and its answer become tokens (what the model saw in training):

* text = ``prompt + separator + answer``; the separator is ``answer_separator``
  (default ``" "``, or ``""`` with a chat template) and is left out when the prompt
  already ends with, or the answer starts with, whitespace;
* the prompt's tokens are ``tokenizer(prompt)`` without special tokens, the answer's
  are the rest of ``tokenizer(text)`` (so tokenisers that merge across the boundary
  give the tokens seen in training), falling back to the separately tokenised answer
  when the prompt's tokens are not a prefix of the text's;
* ``add_bos`` (default: when the tokenizer has a bos token distinct from its eos token,
  or adds bos itself; never with a chat template, which writes its own) puts the bos
  token first;
* with ``chat_template = True`` the prompt is rendered as one user message with the
  base tokenizer's chat template and the generation prompt;
* ``exact_match`` and user scorers append the tokenizer's eos token after the answer:
  greedy decoding is right only if it stops there;
* generation tasks (``TaskSpec.generate``, see :mod:`fitness.generation`) put their
  ``fewshot`` examples (rows of ``fewshot_file`` picked with ``fewshot_seed``, the same for
  every trial; never a row either split scores) before each prompt: ``prompt + separator +
  answer`` joined by ``fewshot_separator``, or user / assistant turns with a chat template.

Rows are numbered from 1 in file order; errors name the file, the row and the field.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fitness.errors import FitnessError
from fitness.extract import GenerationPlan, compile_pattern, gold_problem
from fitness.spec import CHOICE_METRICS, FORMATS, SPLITS, TEST_SPLIT, TaskSpec
from fitness.subset import subset_indices


@dataclass(frozen=True)
class SliceExample:
    """One row of a slice: its text, its tokens, and where it came from."""

    prompt: str
    answer: str
    file: Path
    row: int  # 1-based row in `file`
    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[tuple[int, ...], ...]  # the answer's tokens, or one entry per option
    choices: tuple[str, ...] = ()
    label: int = -1  # right option (choice metrics), else -1

    @property
    def answer_ids(self) -> tuple[int, ...]:
        return self.continuation_ids[0]


@dataclass(frozen=True, eq=False)
class EncodedBatch:
    """Right-padded sequences ``prompt + continuation (+ eos)``; CPU until moved.

    ``target_ids[:, t]`` is the token position ``t`` must predict (``input_ids[:, t + 1]``);
    ``answer_mask`` marks predictions of answer / option tokens, ``stop_mask`` the
    prediction of the end token after the answer. ``scored_columns`` lists positions
    where any row has a mask set (the only logits the scorer needs).
    """

    input_ids: torch.Tensor  # (rows, length) int64
    attention_mask: torch.Tensor  # (rows, length) int64
    position_ids: torch.Tensor  # (rows, length) int64
    target_ids: torch.Tensor  # (rows, length) int64
    answer_mask: torch.Tensor  # (rows, length) bool
    stop_mask: torch.Tensor  # (rows, length) bool
    scored_columns: torch.Tensor  # (k,) int64
    sequence_index: torch.Tensor  # (rows,) int64: index into the slice's sequences
    example_index: torch.Tensor  # (rows,) int64: index into the slice's examples

    def to(self, device: torch.device | str) -> EncodedBatch:
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in _TENSOR_FIELDS}
        return EncodedBatch(**moved)


_TENSOR_FIELDS: tuple[str, ...] = (
    "input_ids", "attention_mask", "position_ids", "target_ids", "answer_mask", "stop_mask",
    "scored_columns", "sequence_index", "example_index",
)


@dataclass(frozen=True, eq=False)
class EncodedSlice:
    """A tokenised split of one task: examples in file order, batches sorted by length."""

    task: str
    split: str  # "search" | "heldout" | "test"
    metric: str
    files: tuple[Path, ...]
    examples: tuple[SliceExample, ...]
    batches: tuple[EncodedBatch, ...]
    sequence_example: torch.Tensor  # (sequences,) example of each sequence
    sequence_choice: torch.Tensor  # (sequences,) option number of each sequence (0 if not choice)
    labels: torch.Tensor  # (examples,) right option per example (-1 if not choice)
    end_token_id: int | None = None  # the eos appended after answers, if any
    generation: GenerationPlan | None = None  # generation tasks: how to decode and judge

    @property
    def n(self) -> int:
        return len(self.examples)

    def to(self, device: torch.device | str) -> EncodedSlice:
        """The same slice with its batches on ``device`` (call once per worker)."""
        return replace(self, batches=tuple(batch.to(device) for batch in self.batches))


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    search: EncodedSlice
    heldout: EncodedSlice
    test: EncodedSlice | None = None  # the task's `test` file (search/test_split.py), if any


@dataclass(frozen=True)
class _Row:
    file: Path
    row: int
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    label: int = -1


@dataclass
class _Sequence:
    example: int
    choice: int
    ids: list[int] = field(default_factory=list)
    answer_start: int = 0  # first continuation token's position in `ids`
    answer_end: int = 0  # one past the last continuation token
    has_stop: bool = False


def load_task(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64) -> TaskData:
    """Read, split, check and tokenise one task (once per study)."""
    if batch_size < 1:
        raise FitnessError(f"task {spec.name!r}: batch_size must be >= 1, got {batch_size}")
    search_rows, heldout_rows, test_rows = _split_rows(spec)
    encoder = _Encoder(spec, tokenizer, _fewshot_rows(spec, search_rows, heldout_rows, test_rows))
    if spec.generate is not None:  # every gold answer judgeable (the regex hint is validate's)
        _check_generation(spec, [*search_rows, *heldout_rows, *test_rows], 0, _print_warning)
    return TaskData(
        spec=spec,
        search=encoder.encode("search", search_rows, batch_size),
        heldout=encoder.encode("heldout", heldout_rows, batch_size),
        test=None if spec.test is None else encoder.encode(TEST_SPLIT, test_rows, batch_size),
    )


def check_task(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, encode_rows: int = 8,
               warn: Callable[[str], None] | None = None) -> dict[str, int]:
    """What ``load_task`` would refuse, without tokenising everything (``search validate``).

    Every row of every file is read and checked against the fields and the metric, the
    splits are made and checked disjoint, and the first ``encode_rows`` rows of each split
    are tokenised (chat template, bos / eos, empty encodings). Generation tasks: the few-shot
    rows are read and checked against both splits, every gold answer must be usable by the
    comparison, and ``warn`` (default: a ``warning:`` line on stderr) hears when ``extract``
    matches none of the first rows' answers. Returns the rows per split.
    """
    search_rows, heldout_rows, test_rows = _split_rows(spec)
    encoder = _Encoder(spec, tokenizer, _fewshot_rows(spec, search_rows, heldout_rows, test_rows))
    for rows in (search_rows, heldout_rows, test_rows):
        for row in rows[:encode_rows]:
            encoder._example(row)
    if spec.generate is not None:
        _check_generation(spec, [*search_rows, *heldout_rows, *test_rows], encode_rows, warn or _print_warning)
    counts = {"search": len(search_rows), "heldout": len(heldout_rows)}
    return {**counts, TEST_SPLIT: len(test_rows)} if spec.test is not None else counts


def _split_rows(spec: TaskSpec) -> tuple[list[_Row], list[_Row], list[_Row]]:
    """The rows of the search, held-out and test splits (test: [] without a test file), read,
    split, checked disjoint and cut to a ``limit`` subset."""
    search_rows = _read_source(spec, spec.search)
    if spec.heldout is None:
        search_rows, heldout_rows = _split(spec, search_rows)
    else:
        heldout_rows = _read_source(spec, spec.heldout)
    _check_disjoint(spec, search_rows, heldout_rows)
    test_rows = [] if spec.test is None else _read_source(spec, spec.test)
    _check_disjoint(spec, search_rows, test_rows, ("search", "test"))
    _check_disjoint(spec, heldout_rows, test_rows, ("held-out", "test"))
    if spec.limit is not None:  # a seeded subset, stratified by label (fitness/subset.py)
        search_rows, heldout_rows, test_rows = (
            [rows[i] for i in subset_indices(len(rows), spec.limit, seed=spec.split_seed, key=f"{spec.name}/{split}",
                                             labels=[row.label for row in rows])] if rows else rows
            for split, rows in zip((*SPLITS, TEST_SPLIT), (search_rows, heldout_rows, test_rows), strict=True))
    return search_rows, heldout_rows, test_rows


def _fewshot_rows(spec: TaskSpec, search: Sequence[_Row], heldout: Sequence[_Row],
                  test: Sequence[_Row] = ()) -> tuple[_Row, ...]:
    """The few-shot rows (seeded pick from ``fewshot_file``); none of them is a scored row."""
    generate = spec.generate
    if generate is None or not generate.fewshot:
        return ()
    assert generate.fewshot_file is not None  # checked by GenerateSpec
    pool = _read_source(spec, generate.fewshot_file)
    for split, rows in (("held-out", heldout), ("search", search), ("test", test)):
        found = _first_overlap(rows, pool)
        if found is not None:
            row, twin = found
            raise FitnessError(
                f"task {spec.name!r}: generate.fewshot_file: {row.file}: row {row.row}: field "
                f"{spec.prompt_field!r} is also a {split} row ({twin.file}: row {twin.row}); few-shot "
                "examples must not be rows the study scores"
            )
    if len(pool) < generate.fewshot:
        raise FitnessError(
            f"task {spec.name!r}: generate.fewshot = {generate.fewshot} but {generate.fewshot_file} has "
            f"{len(pool)} rows"
        )
    order = np.random.default_rng(generate.fewshot_seed).permutation(len(pool))[: generate.fewshot]
    return tuple(pool[i] for i in order.tolist())


def _check_generation(spec: TaskSpec, rows: Sequence[_Row], first: int, warn: Callable[[str], None]) -> None:
    generate = spec.generate
    assert generate is not None
    where = f"task {spec.name!r}"
    for row in rows:
        problem = gold_problem(generate, row.answer)
        if problem is not None:
            raise FitnessError(
                f"{where}: {row.file}: row {row.row}: field {spec.answer_field!r} ({row.answer!r}) cannot be "
                f"judged: {problem}"
            )
    if generate.extract is not None and not generate.extract_gold:
        pattern = compile_pattern(generate.extract)
        sample = rows[:first]
        if sample and not any(pattern.search(row.answer) for row in sample):
            examples = "; ".join(repr(row.answer) for row in sample[:3])
            warn(
                f"{where}: generate.extract '{generate.extract}' matches none of the first {len(sample)} "
                f"answers (e.g. {examples}); if the model answers like the data, every verdict will be 0"
            )


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- reading ---------------------------------------------------------------------------


def _data_files(spec: TaskSpec, path: Path) -> list[Path]:
    where = f"task {spec.name!r}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise FitnessError(f"{where}: folder {path} has no {'/'.join(FORMATS)} files")
        formats = {FORMATS[p.suffix.lower()] for p in files}
        if len(formats) > 1:
            raise FitnessError(f"{where}: folder {path} mixes formats ({', '.join(sorted(formats))})")
        return files
    if not path.is_file():
        raise FitnessError(f"{where}: data file {path} does not exist")
    if path.suffix.lower() not in FORMATS:
        raise FitnessError(f"{where}: {path}: unsupported format (expected {'/'.join(FORMATS)})")
    return [path]


def _read_source(spec: TaskSpec, path: Path) -> list[_Row]:
    rows: list[_Row] = []
    for file in _data_files(spec, Path(path)):
        rows.extend(_read_file(spec, file))
    return rows


def _read_file(spec: TaskSpec, file: Path) -> list[_Row]:
    fmt = FORMATS[file.suffix.lower()]
    size = file.stat().st_size
    # small text files of only whitespace are empty too (larger ones fail below as "no rows")
    if size == 0 or (fmt != "parquet" and size < 4096 and not file.read_bytes().strip()):
        raise FitnessError(f"task {spec.name!r}: {file}: the file is empty")
    kwargs: dict[str, object] = {}
    if fmt == "csv":  # keep text as written ("007" stays "007"; empty cells stay "")
        kwargs = {"converters": {spec.prompt_field: str, spec.answer_field: str}, "keep_default_na": False}
    progress_was_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        table = datasets.load_dataset(fmt, data_files=str(file), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise FitnessError(f"task {spec.name!r}: {file}: cannot read as {fmt}: {exc}") from exc
    finally:
        if not progress_was_off:
            datasets.utils.enable_progress_bars()
    if len(table) == 0:
        raise FitnessError(f"task {spec.name!r}: {file}: the file has no rows")
    return [_parse_row(spec, file, number, record) for number, record in enumerate(table, start=1)]


def _parse_row(spec: TaskSpec, file: Path, number: int, record: Mapping[str, object]) -> _Row:
    where = f"task {spec.name!r}: {file}: row {number}"
    prompt = _text_field(record, spec.prompt_field, where, "prompt_field")
    if spec.metric not in CHOICE_METRICS:
        return _Row(file, number, prompt, _text_field(record, spec.answer_field, where, "answer_field"))
    assert spec.choices_field is not None  # checked by TaskSpec
    raw_choices = record.get(spec.choices_field)
    if raw_choices is None:
        raise FitnessError(_missing(record, spec.choices_field, where, "choices_field", spec.metric))
    if not isinstance(raw_choices, list) or not raw_choices:
        raise FitnessError(f"{where}: field {spec.choices_field!r} must be a non-empty list of strings")
    choices = tuple(_as_text(value, spec.choices_field, where) for value in raw_choices)
    if any(not choice.strip() for choice in choices):
        raise FitnessError(f"{where}: field {spec.choices_field!r} has an empty option")
    if spec.label_field is not None:
        label = record.get(spec.label_field)
        if label is None:
            raise FitnessError(_missing(record, spec.label_field, where, "label_field"))
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise FitnessError(
                f"{where}: field {spec.label_field!r} must be an option index in [0, {len(choices)}), got {label!r}"
            )
        return _Row(file, number, prompt, choices[label], choices, label)
    answer = _text_field(record, spec.answer_field, where, "answer_field")
    if answer not in choices:
        raise FitnessError(f"{where}: field {spec.answer_field!r} ({answer!r}) is not one of the options")
    return _Row(file, number, prompt, answer, choices, choices.index(answer))


def _text_field(record: Mapping[str, object], name: str, where: str, key: str) -> str:
    value = record.get(name)
    if value is None:
        raise FitnessError(_missing(record, name, where, key))
    text = _as_text(value, name, where)
    if not text.strip():
        raise FitnessError(f"{where}: field {name!r} is empty")
    return text


def _missing(record: Mapping[str, object], name: str, where: str, key: str, metric: str | None = None) -> str:
    """A missing (or null) field, with the row's own fields and the task key that picks it."""
    present = [str(k) for k, v in record.items() if v is not None]
    needs = f" (metric {metric!r} reads it)" if metric else ""
    return (
        f"{where}: missing field {name!r}{needs}; the row has {', '.join(map(repr, present)) or 'no fields'} "
        f"(set the task's {key} to the field that holds it)"
    )


def _as_text(value: object, name: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise FitnessError(f"{where}: field {name!r} must be text, got {type(value).__name__}")


def _split(spec: TaskSpec, rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
    n_heldout = round(len(rows) * spec.heldout_fraction)
    if not 0 < n_heldout < len(rows):
        raise FitnessError(
            f"task {spec.name!r}: {spec.search}: {len(rows)} rows cannot be split with "
            f"heldout_fraction {spec.heldout_fraction} (both splits need at least one row)"
        )
    order = np.random.default_rng(spec.split_seed).permutation(len(rows))
    heldout = set(order[:n_heldout].tolist())
    return ([r for i, r in enumerate(rows) if i not in heldout],
            [r for i, r in enumerate(rows) if i in heldout])


def _check_disjoint(spec: TaskSpec, search: Sequence[_Row], heldout: Sequence[_Row],
                    names: tuple[str, str] = ("search", "held-out")) -> None:
    """No prompt of the second split (``names[1]``) is also in the first."""
    found = _first_overlap(search, heldout)
    if found is not None:
        row, twin = found
        raise FitnessError(
            f"task {spec.name!r}: {row.file}: row {row.row}: field {spec.prompt_field!r} also appears "
            f"in the {names[0]} split ({twin.file}: row {twin.row}); {names[0]} and {names[1]} must not overlap"
        )


def _first_overlap(first: Sequence[_Row], second: Sequence[_Row]) -> tuple[_Row, _Row] | None:
    """The first row of ``second`` whose prompt ``first`` also has, with the first such row of
    ``first``; None when they share no prompt (rows are compared by prompt text alone)."""
    by_prompt: dict[str, _Row] = {}
    for row in first:
        by_prompt.setdefault(row.prompt, row)
    for row in second:
        twin = by_prompt.get(row.prompt)
        if twin is not None:
            return row, twin
    return None


# -- tokenising ------------------------------------------------------------------------


class _Encoder:
    """Turns rows into padded batches with one tokenizer and one task's settings."""

    def __init__(self, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, shots: Sequence[_Row] = ()) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.shots = tuple(shots)
        self.where = f"task {spec.name!r}"
        if spec.chat_template and not getattr(tokenizer, "chat_template", None):
            raise FitnessError(f"{self.where}: chat_template = true but the base tokenizer has no chat template")
        default_separator = "" if spec.chat_template else " "
        self.separator = default_separator if spec.answer_separator is None else spec.answer_separator
        self.bos = self._bos_prefix()
        self.end_token_id: int | None = None
        if spec.metric not in CHOICE_METRICS and spec.metric not in ("loglik", "perplexity"):
            # exact_match and user scorers: greedy decoding must stop right after the answer
            if tokenizer.eos_token_id is None and spec.generate is None:  # generation: stop strings suffice
                raise FitnessError(
                    f"{self.where}: metric {spec.metric!r} needs the tokenizer's eos token to tell "
                    "where an answer ends, and the tokenizer has none"
                )
            self.end_token_id = None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
        self.pad_id = next(
            (int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
        )

    def _bos_prefix(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        add = self.spec.add_bos
        if add is None:
            adds_itself = bos is not None and self.tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
            add = not self.spec.chat_template and bos is not None and (bos != self.tokenizer.eos_token_id or adds_itself)
        if add and bos is None:
            raise FitnessError(f"{self.where}: add_bos = true but the tokenizer has no bos token")
        return [int(bos)] if add and bos is not None else []

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_text(self, row: _Row) -> str:
        if not self.spec.chat_template:
            if not self.shots:
                return row.prompt
            assert self.spec.generate is not None
            shots = [self._join(shot.prompt, shot.answer) for shot in self.shots]
            return self.spec.generate.fewshot_separator.join([*shots, row.prompt])
        turns: list[dict[str, str]] = []
        for shot in self.shots:
            turns += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.answer}]
        rendered = self.tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": row.prompt}], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(rendered, str)
        return rendered

    def _join(self, prompt: str, answer: str) -> str:
        """``prompt + separator + answer`` as training text is joined (see the module docstring)."""
        separator = "" if not prompt or prompt[-1].isspace() or answer[:1].isspace() else self.separator
        return prompt + separator + answer

    def _continuation(self, prompt_text: str, prompt_ids: list[int], answer: str, row: _Row,
                      field_name: str) -> list[int]:
        separator = self.separator
        if not prompt_text or prompt_text[-1].isspace() or answer[:1].isspace():
            separator = ""
        whole = self._ids(prompt_text + separator + answer)
        if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
            continuation = whole[len(prompt_ids):]
        else:  # the tokenizer merged across the boundary: keep the prompt's own tokens
            continuation = self._ids(separator + answer)
        if not continuation:
            raise FitnessError(
                f"{self.where}: {row.file}: row {row.row}: field {field_name!r} tokenizes to nothing"
            )
        return continuation

    def _example(self, row: _Row) -> SliceExample:
        prompt_text = self._prompt_text(row)
        text_ids = self._ids(prompt_text)
        if not text_ids:
            raise FitnessError(
                f"{self.where}: {row.file}: row {row.row}: field {self.spec.prompt_field!r} tokenizes to nothing"
            )
        # no second bos when the prompt text (or its chat template) already starts with one
        prompt_ids = text_ids if text_ids[: len(self.bos)] == self.bos else self.bos + text_ids
        if row.choices:
            field_name = self.spec.choices_field or "choices"
            continuations = [self._continuation(prompt_text, text_ids, c, row, field_name) for c in row.choices]
        else:
            continuations = [self._continuation(prompt_text, text_ids, row.answer, row, self.spec.answer_field)]
        return SliceExample(
            prompt=row.prompt, answer=row.answer, file=row.file, row=row.row,
            prompt_ids=tuple(prompt_ids), continuation_ids=tuple(tuple(c) for c in continuations),
            choices=row.choices, label=row.label,
        )

    def encode(self, split: str, rows: Sequence[_Row], batch_size: int) -> EncodedSlice:
        examples = tuple(self._example(row) for row in rows)
        stop = [] if self.end_token_id is None else [self.end_token_id]
        sequences: list[_Sequence] = []
        for index, example in enumerate(examples):
            for choice, continuation in enumerate(example.continuation_ids):
                ids = [*example.prompt_ids, *continuation, *stop]
                start = len(example.prompt_ids)
                sequences.append(_Sequence(index, choice, ids, start, start + len(continuation), bool(stop)))
        # sort by length so batches carry little padding; stable, so deterministic
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))
        batches = tuple(
            self._batch(sequences, order[start: start + batch_size])
            for start in range(0, len(order), batch_size)
        )
        files = tuple(dict.fromkeys(example.file for example in examples))
        return EncodedSlice(
            task=self.spec.name, split=split, metric=self.spec.metric, files=files, examples=examples,
            batches=batches,
            sequence_example=torch.tensor([s.example for s in sequences], dtype=torch.long),
            sequence_choice=torch.tensor([s.choice for s in sequences], dtype=torch.long),
            labels=torch.tensor([e.label for e in examples], dtype=torch.long),
            end_token_id=self.end_token_id,
            generation=None if self.spec.generate is None else GenerationPlan.build(
                self.spec.generate, self.tokenizer, [e.answer for e in examples], batch_size),
        )

    def _batch(self, sequences: Sequence[_Sequence], members: Sequence[int]) -> EncodedBatch:
        length = max(len(sequences[i].ids) for i in members)
        rows = len(members)
        input_ids = torch.full((rows, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        answer_mask = torch.zeros((rows, length), dtype=torch.bool)
        stop_mask = torch.zeros((rows, length), dtype=torch.bool)
        for r, i in enumerate(members):
            seq = sequences[i]
            input_ids[r, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
            attention_mask[r, : len(seq.ids)] = 1
            # position t predicts token t + 1
            answer_mask[r, seq.answer_start - 1: seq.answer_end - 1] = True
            if seq.has_stop:
                stop_mask[r, seq.answer_end - 1] = True
        target_ids = torch.full_like(input_ids, self.pad_id)
        target_ids[:, :-1] = input_ids[:, 1:]
        # right for left or right padding: count real tokens before each position
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        scored_columns = torch.nonzero((answer_mask | stop_mask).any(dim=0)).flatten()
        return EncodedBatch(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            target_ids=target_ids, answer_mask=answer_mask, stop_mask=stop_mask,
            scored_columns=scored_columns,
            sequence_index=torch.tensor(list(members), dtype=torch.long),
            example_index=torch.tensor([sequences[i].example for i in members], dtype=torch.long),
        )
