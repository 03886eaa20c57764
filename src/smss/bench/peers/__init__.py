"""Other systems run beside SMSS by the benchmarks, each in its own module."""
