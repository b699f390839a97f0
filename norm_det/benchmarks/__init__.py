"""Benchmarks as library code: the models' training and inference steps per scheme
(:mod:`.models`); ``tools/benchmark.py`` is their command line."""
