"""A linear-chain conditional random field over per-token scores, batched, padding masked.

For emissions e (B, L, T), a tag sequence y scores
    s(y) = start[y_1] + sum_t e[t, y_t] + sum_{t>1} trans[y_{t-1}, y_t] + end[y_n]
over each sentence's own n = length tokens. Training minimises log Z - s(gold), where
log Z (the forward algorithm) is the log-sum-exp of s over all tag sequences; decoding is
Viterbi's argmax. Masks are left-aligned: True on each sentence's first ``length`` tokens.
"""
from __future__ import annotations

import torch
from torch import nn


class CRF(nn.Module):
    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))  # [from, to]
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s(tags) per sentence (B,)."""
        m = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)                    # (B, L)
        trans = self.transitions[tags[:, :-1], tags[:, 1:]]                             # (B, L-1)
        last = tags.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return self.start[tags[:, 0]] + (emit * m).sum(1) + (trans * m[:, 1:]).sum(1) + self.end[last]

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log Z per sentence (B,), by the forward algorithm in log space."""
        alpha = self.start + emissions[:, 0]                                            # (B, T)
        for t in range(1, emissions.size(1)):
            nxt = torch.logsumexp(alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t].unsqueeze(1), nxt, alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per sentence (B,)."""
        emissions = emissions.float()
        return self.log_partition(emissions, mask) - self.score(emissions, tags, mask)

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The highest-scoring tag sequence of each sentence (Viterbi), cut to its length."""
        emissions = emissions.float()
        score = self.start + emissions[:, 0]
        back = []
        for t in range(1, emissions.size(1)):
            best, arg = (score.unsqueeze(2) + self.transitions).max(dim=1)             # over the previous tag
            back.append(arg)
            score = torch.where(mask[:, t].unsqueeze(1), best + emissions[:, t], score)
        score = score + self.end
        lengths = mask.sum(1).tolist()
        last = score.argmax(1).tolist()
        back_cpu = torch.stack(back, 1).tolist() if back else [[] for _ in lengths]    # (B, L-1, T)
        paths = []
        for b, n in enumerate(lengths):
            tag, path = last[b], [last[b]]
            for t in range(n - 2, -1, -1):
                tag = back_cpu[b][t][tag]
                path.append(tag)
            paths.append(path[::-1])
        return paths
