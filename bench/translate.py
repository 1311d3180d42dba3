"""Translation speed: rnnkit against a minimal hand-written PyTorch encoder-decoder.

The model is configs/translate_attention.yaml (Multi30k en->fr; bidirectional LSTM encoder
256 per direction, LSTM decoder 512 with general attention and input feeding, bridge,
embeddings 256). Both sides see the same batches in the same order; the baseline is what
a person would write by hand (output layer and loss over every padded position; beam
search one sentence at a time, the beam as the batch). Decoding uses the same weights on
both sides (copied from rnnkit's model), so both search the same hypotheses.

    python bench/translate.py [--steps 15] [--rounds 2] [--sentences 300] [--checkpoint best.pt]

Prints target tokens/s in training and beam-5 sentences/s, and the ratios rnnkit / raw.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
CONFIG = ROOT / "configs" / "translate_attention.yaml"


class RawSeq2Seq(nn.Module):
    """The hand-written baseline, same shapes as the config."""

    def __init__(self, vs: int, vt: int, emb: int = 256, enc: int = 256, dec: int = 512, dropout: float = 0.3):
        super().__init__()
        self.src_emb, self.tgt_emb = nn.Embedding(vs, emb, padding_idx=0), nn.Embedding(vt, emb, padding_idx=0)
        self.enc = nn.LSTM(emb, enc, batch_first=True, bidirectional=True)
        self.h_bridge, self.c_bridge = nn.Linear(2 * enc, dec), nn.Linear(2 * enc, dec)
        self.attn_w = nn.Linear(2 * enc, dec, bias=False)
        self.cell = nn.LSTMCell(emb + dec, dec)
        self.combine = nn.Linear(2 * enc + dec, dec, bias=False)
        self.out = nn.Linear(dec, vt)
        self.drop = nn.Dropout(dropout)

    def encode(self, src, lengths):
        packed = pack_padded_sequence(self.drop(self.src_emb(src)), lengths, batch_first=True, enforce_sorted=False)
        mem, (h, c) = self.enc(packed)
        mem, _ = pad_packed_sequence(mem, batch_first=True, total_length=src.size(1))
        h, c = torch.cat([h[0], h[1]], -1), torch.cat([c[0], c[1]], -1)
        mask = torch.arange(src.size(1)).unsqueeze(0) < lengths.unsqueeze(1)
        feed = mem.new_zeros(src.size(0), self.out.in_features)
        return mem, self.attn_w(mem), mask, (torch.tanh(self.h_bridge(h)), self.c_bridge(c)), feed

    def step(self, y, mem, keys, mask, state, feed):
        h, c = self.cell(torch.cat([self.drop(self.tgt_emb(y)), feed], -1), state)
        scores = torch.bmm(keys, h.unsqueeze(2)).squeeze(2).masked_fill(~mask, float("-inf"))
        ctx = torch.bmm(torch.softmax(scores, -1).unsqueeze(1), mem).squeeze(1)
        feed = torch.tanh(self.combine(torch.cat([ctx, h], -1)))
        return self.out(self.drop(feed)), (h, c), feed

    def forward(self, src, lengths, tgt_in):
        mem, keys, mask, state, feed = self.encode(src, lengths)
        logits = []
        for t in range(tgt_in.size(1)):
            lo, state, feed = self.step(tgt_in[:, t], mem, keys, mask, state, feed)
            logits.append(lo)
        return torch.stack(logits, 1)


def copy_weights(raw: RawSeq2Seq, model) -> None:
    """Give the baseline rnnkit's weights (same shapes, other names)."""
    e, d = model.encoder, model.decoder
    pairs = {"src_emb.weight": e.embedding.weight, "tgt_emb.weight": d.embedding.weight,
             "h_bridge.weight": model.bridge.to_h.weight, "h_bridge.bias": model.bridge.to_h.bias,
             "c_bridge.weight": model.bridge.to_c.weight, "c_bridge.bias": model.bridge.to_c.bias,
             "attn_w.weight": d.attention.key_proj.weight, "combine.weight": d.combine.weight,
             "out.weight": d.output.weight, "out.bias": d.output.bias}
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        pairs[f"cell.{name}"] = getattr(d.rnn, f"{name}_l0")
        for suffix in ("_l0", "_l0_reverse"):
            pairs[f"enc.{name}{suffix}"] = getattr(e.rnn, f"{name}{suffix}")
    raw.load_state_dict({k: v.detach().clone() for k, v in pairs.items()})


@torch.no_grad()
def raw_beam(raw: RawSeq2Seq, src_ids: list[list[int]], beam: int, bos: int, eos: int) -> list[list[int]]:
    """Textbook beam search, one sentence at a time."""
    raw.eval()
    outputs = []
    for ids in src_ids:
        src = torch.tensor([ids])
        mem, keys, mask, state, feed = raw.encode(src, torch.tensor([len(ids)]))
        hyps = [([], 0.0)]
        finished = []
        for _ in range(int(len(ids) * 2.0 + 10)):
            k = len(hyps)
            last = torch.tensor([h[0][-1] if h[0] else bos for h in hyps])
            expand = lambda t: t.expand(k, *t.shape[1:])  # noqa: E731
            logits, state, feed = raw.step(last, expand(mem), expand(keys), expand(mask), state, feed)
            logp = torch.log_softmax(logits, -1) + torch.tensor([h[1] for h in hyps]).unsqueeze(1)
            top, idx = logp.view(-1).topk(beam)
            origin, tok = (idx // logp.size(1)).tolist(), (idx % logp.size(1)).tolist()
            keep, new = [], []
            for o, t, s in zip(origin, tok, top.tolist()):
                if t == eos:
                    finished.append((hyps[o][0], s))
                else:
                    keep.append(o)
                    new.append((hyps[o][0] + [t], s))
            if len(finished) >= beam or not new:
                break
            sel = torch.tensor(keep)
            state, feed, hyps = (state[0][sel], state[1][sel]), feed[sel], new
        best = max(finished or hyps, key=lambda h: h[1])
        outputs.append(best[0])
    return outputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=300, help="test_2016_flickr sentences to decode")
    ap.add_argument("--checkpoint", help="decode with these trained weights (e.g. a run's best.pt)")
    ap.add_argument("--quick", action="store_true", help="one short round on a few sentences: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds, args.sentences = 1, 1, 1, 4
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the shared corpora are needed)")
        return 0
    from rnnkit.config import load_config
    from rnnkit.data.parallel import make_batch
    from rnnkit.data.vocab import read_lines
    from rnnkit.runs import load_task, prepare_trainer

    with tempfile.TemporaryDirectory() as tmp:
        def rnnkit_train(r: int) -> tuple[float, object]:
            run = Path(tmp) / f"r{r}"
            cfg = load_config(CONFIG, [f"run_dir={run}", f"train.max_steps={args.warmup + args.steps}",
                                       "train.log_every=1", "train.eval_every=100000", "train.max_time=null",
                                       "train.device=cpu"])
            trainer = prepare_trainer(cfg)
            trainer.task.evaluate = lambda: {"loss": 0.0, "bleu": 0.0}
            trainer.fit()
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rows = {r["step"]: r for r in rows if r["kind"] == "train"}
            tokens = sum(rows[s]["tokens"] for s in range(args.warmup + 1, args.warmup + args.steps + 1))
            return tokens / (rows[args.warmup + args.steps]["elapsed"] - rows[args.warmup]["elapsed"]), trainer.task

        def raw_train(task) -> float:
            torch.manual_seed(0)
            raw = RawSeq2Seq(len(task.src_tok.vocab), len(task.tgt_tok.vocab))
            opt = torch.optim.Adam(raw.parameters(), lr=1e-3)
            every = task.train_batches(0)
            batches = [every[i] for i in range(args.warmup + args.steps)]
            tokens = 0
            for i, indices in enumerate(batches):
                if i == args.warmup:
                    start = time.perf_counter()
                sources, targets = task.train_pairs
                b = make_batch(sources.gather(indices), targets.gather(indices), indices, task.bos, task.eos)
                logits = raw(b.src, b.src_lengths, b.tgt_in)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b.tgt_out.reshape(-1), ignore_index=0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(raw.parameters(), 5.0)
                opt.step()
                tokens += b.tokens if i >= args.warmup else 0
            return tokens / (time.perf_counter() - start)

        ours, base = [], []
        task = None
        for r in range(args.rounds):
            tps, task = rnnkit_train(r)
            ours.append(tps)
            base.append(raw_train(task))
            print(f"round {r + 1}: training raw {base[-1]:.0f}, rnnkit {ours[-1]:.0f} target tokens/s", file=sys.stderr)

    if args.checkpoint:
        task = load_task(args.checkpoint, "cpu")
    model = task.model.eval()
    raw = RawSeq2Seq(len(task.src_tok.vocab), len(task.tgt_tok.vocab)).eval()
    copy_weights(raw, model)
    lines = read_lines(str(DATA / "test_2016_flickr.en"))[: args.sentences]
    start = time.perf_counter()
    ours_out = task.translate(lines, beam=5, batch_size=64)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    raw_out = raw_beam(raw, [task.src_tok.encode(x) for x in lines], 5, task.bos, task.eos)
    t_raw = time.perf_counter() - start
    same = sum(task.tgt_tok.join(task.tgt_tok.vocab.decode(r)) == o.text for r, o in zip(raw_out, ours_out))

    print(f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"training, target tokens/s (best of {args.rounds}): raw {max(base):,.0f}  rnnkit {max(ours):,.0f}  "
          f"ratio {max(ours) / max(base):.2f}")
    print(f"beam-5 decoding, sentences/s ({len(lines)} sentences): raw {len(lines) / t_raw:.1f}  "
          f"rnnkit {len(lines) / t_ours:.1f}  ratio {t_raw / t_ours:.2f}  (identical outputs: {same}/{len(lines)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
