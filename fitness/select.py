"""A slice of some rows of an encoded slice: what one multi-fidelity stage scores.

``select_rows(data, rows)`` keeps the examples ``rows`` (indices into ``data.examples``) in
that order and re-batches their already tokenised sequences (no tokenizer needed): sorted by
length, at most as many per batch as ``data``'s largest batch, right-padded as
``fitness.slices`` pads. Scoring the result gives one value per selected row, in ``rows``'
order, computed as scoring the whole slice computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fitness.errors import FitnessError
from fitness.slices import EncodedBatch, EncodedSlice


def select_rows(data: EncodedSlice, rows: Sequence[int]) -> EncodedSlice:
    """``data`` cut to the examples ``rows`` (in that order; see the module)."""
    if not rows:
        raise FitnessError(f"task {data.task!r} ({data.split}): no rows selected")
    if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= data.n:
        raise FitnessError(f"task {data.task!r} ({data.split}): rows must be distinct indices below {data.n}")
    new_example = {old: new for new, old in enumerate(rows)}
    # where each original sequence lives: (batch, row in batch, real length)
    located: dict[int, tuple[int, int, int]] = {}
    for b, batch in enumerate(data.batches):
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for r, sequence in enumerate(batch.sequence_index.tolist()):
            located[sequence] = (b, r, int(lengths[r]))
    old_sequences = [s for s, e in enumerate(data.sequence_example.tolist()) if e in new_example]
    old_sequences.sort(key=lambda s: (new_example[int(data.sequence_example[s])], s))  # example, then option order
    new_sequence = {old: new for new, old in enumerate(old_sequences)}
    batch_size = max(batch.input_ids.shape[0] for batch in data.batches)
    order = sorted(old_sequences, key=lambda s: located[s][2])  # stable: by length, as slices batches
    batches = tuple(
        _batch(data, order[start:start + batch_size], located, new_sequence, new_example)
        for start in range(0, len(order), batch_size)
    )
    generation = data.generation
    if generation is not None:
        generation = replace(generation, golds=tuple(generation.golds[i] for i in rows))
    return replace(
        data, examples=tuple(data.examples[i] for i in rows), batches=batches,
        sequence_example=torch.tensor([new_example[int(data.sequence_example[s])] for s in old_sequences],
                                      dtype=torch.long),
        sequence_choice=data.sequence_choice[old_sequences].clone(),
        labels=data.labels[list(rows)].clone(),
        generation=generation,
    )


def _batch(data: EncodedSlice, members: Sequence[int], located: dict[int, tuple[int, int, int]],
           new_sequence: dict[int, int], new_example: dict[int, int]) -> EncodedBatch:
    length = max(located[s][2] for s in members)
    # every original row is at least its real length long; take its first `length` columns
    # (the padding after a shorter row's end is the slice's padding already)
    picked: dict[str, list[torch.Tensor]] = {name: [] for name in ("input_ids", "attention_mask", "target_ids", "answer_mask", "stop_mask")}
    for s in members:
        b, r, _ = located[s]
        source = data.batches[b]
        width = source.input_ids.shape[1]
        for name, values in picked.items():
            row = getattr(source, name)[r].cpu()
            if width < length:  # a row from a shorter batch: more right padding, masked off (any token
                # id does: attention and the answer / stop masks never reach past a row's end)
                row = torch.cat([row, torch.zeros(length - width, dtype=row.dtype)])
            values.append(row[:length])
    input_ids = torch.stack(picked["input_ids"])
    attention_mask = torch.stack(picked["attention_mask"])
    answer_mask = torch.stack(picked["answer_mask"])
    stop_mask = torch.stack(picked["stop_mask"])
    target_ids = torch.stack(picked["target_ids"])
    return EncodedBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        target_ids=target_ids, answer_mask=answer_mask, stop_mask=stop_mask,
        scored_columns=torch.nonzero((answer_mask | stop_mask).any(dim=0)).flatten(),
        sequence_index=torch.tensor([new_sequence[s] for s in members], dtype=torch.long),
        example_index=torch.tensor([new_example[int(data.sequence_example[s])] for s in members], dtype=torch.long),
    )
