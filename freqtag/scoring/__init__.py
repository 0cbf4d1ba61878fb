"""Scores of finished runs: the ensemble and its tables, the MediaEval submission and evaluate."""
