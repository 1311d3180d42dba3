"""Tokenizers, vocabularies, readers and batching; nothing here knows about models."""
