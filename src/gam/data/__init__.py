"""Data for GAM language modelling: corpora, BPE tokenizers, cached token ids, token blocks.

Typical use::

    from gam.data import load_corpus, train_tokenizer, encode_corpus, TokenBlocks

    corpus = load_corpus("wikitext2", max_train_rows=50_000, max_val_rows=5_000)
    tokenizer = train_tokenizer(corpus, kind="bytelevel", vocab_size=10_000)
    ids = encode_corpus(corpus, tokenizer)            # {"train": array, "valid": ..., ...}
    train = TokenBlocks(ids["train"], block_size=256)  # drop_last=True
    valid = TokenBlocks(ids["valid"], block_size=256, drop_last=False)
"""

from gam.constants import IGNORE_INDEX
from gam.data.blocks import TokenBlocks
from gam.data.corpora import KNOWN_CORPORA, default_data_dir, load_austen, load_corpus
from gam.data.corpus import Corpus, DataNotFoundError
from gam.data.tokenizer import TOKENIZER_KINDS, eot_token_id, train_tokenizer
from gam.data.tokens import encode_corpus
from gam.files import default_cache_dir

__all__ = [
    "IGNORE_INDEX",
    "KNOWN_CORPORA",
    "TOKENIZER_KINDS",
    "Corpus",
    "DataNotFoundError",
    "TokenBlocks",
    "default_cache_dir",
    "default_data_dir",
    "encode_corpus",
    "eot_token_id",
    "load_austen",
    "load_corpus",
    "train_tokenizer",
]
