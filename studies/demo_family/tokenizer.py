"""The demo family's word-level tokenizer: one token per whitespace-separated word."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from studies.demo_family.tasks import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
MAX_LENGTH = 32  # longest example is 17 tokens with <bos> and <eos>


def build_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel over the tasks' vocabulary; encoding a text prepends ``<bos>``."""
    vocab = {word: index for index, word in enumerate((*SPECIALS, *vocabulary()))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Prompts are encoded with special tokens (<bos> first), answers without.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
    )
