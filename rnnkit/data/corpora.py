"""The corpora the configs use: what they are, where they come from, and their exact bytes
(size and SHA-256), so ``rnnkit data get`` can fetch them and prove the copy is the one the
results were measured on. Folder names match ``../shared/data``."""
from __future__ import annotations

from typing import NamedTuple


class Corpus(NamedTuple):
    name: str
    description: str
    licence: str
    source: str                      # where the data comes from (for people)
    upstream: str | None             # a base URL serving these exact files, when one exists
    files: tuple[tuple[str, int, str], ...]    # (path in the folder, bytes, SHA-256)


CORPORA = {c.name: c for c in (
    Corpus("tinyshakespeare", "40,000 lines of Shakespeare, 1,115,394 characters (character language models)",
           "public domain",
           "https://github.com/karpathy/char-rnn (data/tinyshakespeare/input.txt)",
           'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare',
           (
            ("input.txt", 1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
           )),
    Corpus("multi30k", "Multi30k task 1 captions, en/fr/de: train 29,000, val 1,014, test 1,000 (translation)",
           "research use (see the Multi30k repository)",
           "https://github.com/multi30k/dataset (data/task1/raw, decompressed)",
           None,
           (
            ("test_2016_flickr.de", 70649, "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
            ("test_2016_flickr.en", 62076, "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
            ("test_2016_flickr.fr", 72261, "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6"),
            ("train.de", 2110398, "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
            ("train.en", 1801238, "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
            ("train.fr", 2111303, "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d"),
            ("val.de", 75981, "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
            ("val.en", 63297, "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
            ("val.fr", 73924, "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc"),
           )),
    Corpus("ud-english-ewt", "UD English-EWT, CoNLL-U: train 12,544 / dev 2,001 / test 2,077 sentences (tagging)",
           "CC BY-SA 4.0",
           "https://github.com/UniversalDependencies/UD_English-EWT",
           None,
           (
            ("en_ewt-ud-dev.conllu", 1805545, "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6"),
            ("en_ewt-ud-test.conllu", 1804515, "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd"),
            ("en_ewt-ud-train.conllu", 14203025, "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b"),
           )),
    Corpus("uner-english-ewt", "Universal NER v1 on English-EWT dev and test, IOB2 (named entities)",
           "CC BY-SA 4.0",
           "https://github.com/UniversalNER/UNER_English-EWT",
           None,
           (
            ("en_ewt-ud-dev.iob2", 620415, "0cafd881cf31d39897b6d588420fab8fbbe4423d271725c59921ac9dd49c0713"),
            ("en_ewt-ud-test.iob2", 623751, "821ad826d5f503ac03b4edc3fbc2174f21fbb005ec25863caf2051c434616d6e"),
           )),
    Corpus("rt-polarity", "movie-review sentence polarity, train 8,528 / dev 1,066 (classification)",
           "research use; cite Pang and Lee (2005)",
           "https://github.com/yoonkim/CNN_sentence (rt-polarity.pos/neg, converted)",
           None,
           (
            ("dev.tsv", 127217, "843ab7aee9485e8740d2a6e20c13703a028178eda9dea0433513c0b7b0c28770"),
            ("train.tsv", 1018453, "414ce7ecf51a0e64c4e6893407c623aeeca7020db690626ceb25e2b6c31d357d"),
           )),
    Corpus("ett", "ETTh1: hourly transformer load and oil temperature, 17,420 rows (forecasting)",
           "CC BY-ND 4.0; cite Zhou et al. (2021)",
           "https://github.com/zhouhaoyi/ETDataset (ETT-small/ETTh1.csv)",
           None,
           (
            ("ETTh1.csv", 2589657, "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"),
            ("LICENSE", 17818, "83cbb5c31415b1d0ee1d20d35dae3fda3a045b85fae9364cc57facc9cd6e0946"),
           )),
)}
