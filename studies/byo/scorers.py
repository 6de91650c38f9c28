"""An example user scorer, named in ``study.toml`` as ``studies.byo.scorers:token_accuracy``.

A user scorer is called as ``function(model, batch, examples)`` inside
``torch.inference_mode()``, once per batch of the slice (see ``fitness/metrics.py``):
``batch`` is a ``fitness.slices.EncodedBatch`` on the model's device, one right-padded
row per example (``<bos>? prompt answer <eos>``); ``examples`` are the rows'
``fitness.slices.SliceExample`` (prompt and answer text, token ids, file and row). It
returns one float per row; the slice's score is their mean. Higher is better unless the
function has ``higher_is_better = False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from fitness.slices import EncodedBatch, SliceExample


def token_accuracy(model: PreTrainedModel, batch: EncodedBatch,
                   examples: Sequence[SliceExample]) -> torch.Tensor:
    """Per row, the share of the answer's tokens and its end token that the model predicts.

    Teacher-forced like ``exact_match`` (the argmax at each position, given the gold
    prefix), but with partial credit: a reply that gets 18 of 20 tokens right scores 0.9
    where ``exact_match`` gives 0. A row scores 1.0 exactly when ``exact_match`` would
    (except that ``exact_match`` also accepts the model's own ``generation_config``
    end tokens).
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    scored = batch.answer_mask | batch.stop_mask  # position t predicts token t + 1
    hits = (logits.argmax(dim=-1) == batch.target_ids) & scored
    return hits.sum(dim=1) / scored.sum(dim=1)
