"""CLIP tokenizers built offline: OpenAI's, from the BPE merges that ship with the package, or any other from its merges."""

import functools
import gzip
from collections.abc import Sequence
from importlib import resources

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of its BPE file; with 256 byte tokens, their 256 end-of-word
# forms and the two special tokens that makes the 49408-token vocabulary of every released CLIP.
NUM_CLIP_MERGES = 49152 - 256 - 2


def clip_tokenizer_from_merges(merges: Sequence[tuple[str, str]], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with CLIP's vocabulary layout: the 256 byte tokens, their end-of-word forms, one token per
    merge in merge order, then <|startoftext|> and <|endoftext|>."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocabulary, merges=[tuple(merge) for merge in merges], model_max_length=model_max_length)


@functools.cache
def _openai_clip_merges() -> tuple[tuple[str, str], ...]:
    with resources.files("maft").joinpath("data/bpe_simple_vocab_16e6.txt.gz").open("rb") as compressed:
        lines = gzip.decompress(compressed.read()).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1])


def load_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The tokenizer of OpenAI's CLIP models (e.g. `openai/clip-vit-base-patch16`), with no download."""
    return clip_tokenizer_from_merges(_openai_clip_merges(), model_max_length)
