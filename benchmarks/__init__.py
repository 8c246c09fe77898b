"""embfactor benchmarks: decomposition speed vs peers, layer runtime, compress memory.

Run them with ``embfactor bench`` (or ``python -m benchmarks.<suite>`` from the repository root). They write
JSON and markdown to ``benchmarks/results/`` and never assert on timings.
"""
