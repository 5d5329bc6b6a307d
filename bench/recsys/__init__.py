"""Shared code of the accuracy and streaming benchmarks: MovieLens protocols, baselines, metrics."""
