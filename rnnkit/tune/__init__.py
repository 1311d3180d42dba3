"""Hyperparameter sweeps on Optuna: ``rnnkit tune``.

``space`` reads and checks a search space against the config schema; ``study`` opens the
study (its storage, sampler and pruner), counts what is finished and writes ``best.yaml``;
``trial`` runs one trial as an ordinary run folder, reporting every evaluation to the pruner;
``workers`` runs trials in parallel processes; ``report`` is ``rnnkit tune --show``.
"""
