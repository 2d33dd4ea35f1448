"""The question tokenizer: the run's BERT tokenizer, and word-level vocabularies for datasets of our own.

transformers is imported when a tokenizer is needed (it costs seconds; `python -m lxmert check` needs none)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..core.config import Config
from ..core.errors import InputError


def tokenizer_source(cfg: Config) -> str:
    """Where the run's tokenizer comes from: `model.tokenizer` (hub id or folder) or the dataset's own."""
    return cfg.model.tokenizer or str(Path(cfg.data.root) / "tokenizer")


def load_tokenizer(cfg: Config):
    """The BERT tokenizer of the run: `model.tokenizer` (hub id or folder) or the dataset's own."""
    from transformers import BertTokenizer

    source = tokenizer_source(cfg)
    try:
        return BertTokenizer.from_pretrained(source)
    except OSError as e:
        raise InputError(f"cannot load tokenizer '{source}' (model.tokenizer): {e}") from None


def write_vocab_tokenizer(folder: Path, sentences: Iterable[str]) -> None:
    """A word-level BERT vocabulary of the sentences, saved as a transformers BertTokenizer (which
    from_pretrained reads back; BertTokenizerFast(vocab_file=...) would silently ignore the file)."""
    from transformers import BertTokenizer

    words: set[str] = set()
    backend = BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1}).backend_tokenizer
    for s in sentences:
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))
