"""Benchmarks for checkpoints: HellaSwag, and an offline cloze set in the same format."""
