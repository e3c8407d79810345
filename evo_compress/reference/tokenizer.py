"""The reference character-level tokenizer: one token per character, standard HF format.

Built with the ``tokenizers`` library (a WordLevel model over single characters, a
pre-tokenizer that isolates every character, a Fuse decoder so decoding inserts no spaces) and
wrapped in ``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(folder)`` loads it.
No special token is added on encode: ``tokenizer("12+34=")`` is exactly the six characters,
which is also what lm-eval feeds the model (it adds BOS only when the tokenizer does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# The characters of the addition task; the newline ends every answer.
CHARACTERS = (*"0123456789", "+", "=", "\n")
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}


def build_tokenizer(model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """The character tokenizer (ids: 0-3 pad/bos/eos/unk, then digits, '+', '=', newline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    # `[\s\S]`, not `.`: the newline must be a token of its own, not dropped or merged.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
