"""rnnkit's benchmarks; ``python -m bench`` runs the suite."""
