"""Caption normalisation and tokenizer construction, shared by the PyTorch families.

``transformers`` is imported only inside ``build_tokenizer``: ``pre_text`` is used on the launcher side
(the sample-data generator) where heavy imports are not allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")
VOCAB_FILE = "vocab.txt"


def pre_text(text: str, max_words: int | None = None) -> str:
    """Normalise a caption or question the way Singularity does before tokenizing.

    Lowercase; drop ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces; ``<person>`` becomes
    ``person``; runs of whitespace collapse to one space. ``max_words`` keeps only the first words.
    """
    text = _PUNCTUATION.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    if max_words:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


def build_tokenizer(spec: str | os.PathLike):
    """A fast tokenizer from ``spec``, never downloading anything.

    ``spec`` is a ``vocab.txt`` file or a directory holding one (a lowercasing BERT WordPiece tokenizer
    is built from it: the sample datasets ship one), a directory saved by ``save_pretrained``, or a
    Hugging Face hub name such as ``bert-base-uncased`` that must already be in the local cache.
    """
    path = Path(os.fspath(spec)).expanduser()
    vocab = path if path.is_file() else path / VOCAB_FILE
    if vocab.is_file():
        from transformers import BertTokenizerFast

        return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)

    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    name = os.fspath(spec)
    if name.startswith((".", "/", "~")) or name.endswith(".txt") or os.sep * 2 in name:
        raise FileNotFoundError(
            f"tokenizer {name!r} not found: give a vocab.txt, a directory holding one, or a hub name"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"tokenizer {name!r} is not in the local Hugging Face cache and downloads are off: run "
            f"`huggingface-cli download {name}` where there is network (or set HF_HOME to a cache that "
            f"has it), or point the tokenizer at a vocab.txt such as the sample data's"
        ) from e
