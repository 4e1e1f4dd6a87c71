"""A small BPE vocabulary learnt from the miniature world's captions, saved in CLIP's tokenizer format."""

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from ..data.clip_tokenizer import clip_tokenizer_from_merges


def train_clip_tokenizer(texts: Iterable[str], max_merges: int = 400, model_max_length: int = 32) -> CLIPTokenizer:
    """Learns BPE merges on `texts` with the `tokenizers` library, split into words as CLIP does (lower case, words
    and punctuation apart, "</w>" ending each word), and returns a `CLIPTokenizer` with CLIP's vocabulary layout."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet_size = 2 * 256
    trainer = trainers.BpeTrainer(vocab_size=alphabet_size + max_merges, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]
    return clip_tokenizer_from_merges(merges, model_max_length)
