"""Turning model scores into text: sampling, greedy and beam search."""
