"""A small real tokenizer built offline with the `tokenizers` library (tests, examples, `moe-trace run`).

`build_tiny_tokenizer(vocab_size)` gives a word-level `PreTrainedTokenizerFast` whose ids fit a tiny
model's vocabulary, with pad / bos / eos / unk tokens (bos is prepended, like most LM tokenizers) and a chat template; `save_pretrained(dir)`
writes it next to a checkpoint so that `AutoTokenizer.from_pretrained(dir)` loads it. Nothing downloads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def build_tiny_tokenizer(vocab_size: int = 256, texts: list[str] | None = None, chat_template: bool = True):
    """A word-level tokenizer of at most `vocab_size` ids (specials 0..3, then the most frequent words of
    `texts`, by default the bundled prompts); unknown words map to `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL) + 1}")
    if texts is None:
        from moe_trace.routing.pipeline import BUNDLED_PROMPTS

        texts = BUNDLED_PROMPTS.read_text(encoding="utf-8").splitlines() + ["user assistant system :"]
    freq: dict[str, int] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t):
            freq[w] = freq.get(w, 0) + 1
    words = sorted(freq, key=lambda w: (-freq[w], w))[: vocab_size - len(SPECIAL)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 256, chat_template: bool = True) -> Path:
    """Build `build_tiny_tokenizer(vocab_size)` and `save_pretrained` it into directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size, chat_template=chat_template).save_pretrained(str(path))
    return path
