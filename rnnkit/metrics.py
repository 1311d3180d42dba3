"""Corpus metrics on detokenised text (sacreBLEU's defaults) and helpers for losses."""
from __future__ import annotations

import math
from typing import Sequence


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], force=True).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def perplexity(loss: float) -> float:
    """exp(loss in nats per token), capped to stay finite."""
    return math.exp(min(loss, 50.0))
