"""Benchmarks of the worker against the raw vLLM engine: ``python -m bench`` (``__main__``)."""
