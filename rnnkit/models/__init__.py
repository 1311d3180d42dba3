"""Recurrent building blocks: cells, stacked RNNs, attention, encoders, decoders."""
