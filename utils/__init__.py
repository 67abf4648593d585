"""Applications built on the trainer: reports, benchmarks, checkpoint conversion, inference and demos."""
