"""Contextual word features from frozen language models (Flair's "contextual string
embeddings", Akbik et al. 2018, generalised to word LMs).

Each LM reads the sentence on its own from a zero state, in its direction (a backward LM,
trained with ``data.reverse``, reads it right to left), and each word gets the LM's top-layer
state where the LM has just read it: for a word LM, after the word; for a character LM,
after the word's last character (forward) or first character (backward). The states of all
LMs are concatenated. The LMs are frozen: no gradient reaches them and they stay in
evaluation mode (no dropout), so a word in the same sentence always gets the same features.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rnnkit.data.vocab import EOS

LMInput = tuple[list[int], list[int]]     # one LM's token ids for a sentence, and each word's position


class LMFeatures(nn.Module):
    """``specs``: per LM its checkpoint's ``config`` and ``vocab`` (what ``extras`` keeps)."""

    def __init__(self, specs: Sequence[dict[str, Any]]):
        super().__init__()
        from rnnkit.config import load_config
        from rnnkit.tasks import task_module

        self.specs = [{"config": s["config"], "vocab": list(s["vocab"])} for s in specs]
        models = []
        for spec in self.specs:
            cfg = load_config(None, base=spec["config"])
            models.append(task_module("lm").build(cfg, torch.device("cpu"), extras={"vocab": spec["vocab"]},
                                                  with_data=False).model)
        self.lms = nn.ModuleList(models)
        self.lms.requires_grad_(False)
        self._index = [{w: i for i, w in enumerate(s["vocab"])} for s in self.specs]
        self.output_size = sum(s["config"]["model"]["hidden_size"] for s in self.specs)

    def train(self, mode: bool = True) -> "LMFeatures":
        super().train(mode)
        self.lms.eval()       # frozen: never dropout
        return self

    def encode(self, words: Sequence[str]) -> list[LMInput]:
        """Every LM's input ids for the sentence ``words`` and each word's position in them."""
        out = []
        for spec, index in zip(self.specs, self._index):
            data = spec["config"]["data"]
            backward, unk = bool(data.get("reverse")), index.get("<unk>", 0)
            if data["tokenizer"] == "word":
                order = list(reversed(words)) if backward else list(words)
                ids = [index.get(EOS, unk)] + [index.get(w, unk) for w in order]
                n = len(words)
                positions = [n - i for i in range(n)] if backward else [i + 1 for i in range(n)]
            else:
                text, ends, starts = "\n", [], []
                for w in words:
                    starts.append(len(text))
                    text += w
                    ends.append(len(text) - 1)
                    text += " "
                ids = [index.get(c, unk) for c in (text[::-1] if backward else text)]
                last = len(text) - 1
                positions = [last - s for s in starts] if backward else ends
            out.append((ids, positions))
        return out

    def collate(self, items: Sequence[list[LMInput]], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per LM: padded ids (B, S) and positions (B, L) of a batch of encoded sentences."""
        batch = []
        for k in range(len(self.specs)):
            ids = [item[k][0] for item in items]
            pos = [item[k][1] for item in items]
            x = torch.zeros(len(items), max(map(len, ids)), dtype=torch.long)
            p = torch.zeros(len(items), max(1, max(map(len, pos))), dtype=torch.long)
            for i, (a, b) in enumerate(zip(ids, pos)):
                x[i, :len(a)] = torch.as_tensor(a)
                p[i, :len(b)] = torch.as_tensor(b)
            batch.append((x.to(device), p.to(device)))
        return batch

    @torch.no_grad()
    def forward(self, batch: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
        """Features (B, width, D) of the collated batch (positions past a sentence are padding)."""
        parts = []
        for lm, (ids, positions) in zip(self.lms, batch):
            hidden = lm.features(ids).hidden                                  # (B, S, H)
            take = positions[:, :width].unsqueeze(-1).expand(-1, -1, hidden.size(-1))
            parts.append(hidden.gather(1, take))
        return torch.cat(parts, -1).float()
