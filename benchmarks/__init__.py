"""embfactor benchmarks: decomposition speed vs peers, layer runtime, compress memory.

Run them with ``python -m benchmarks.<suite>`` from the repository root (``make bench`` runs decompose, runtime
and memory). They write JSON and markdown to ``benchmarks/results/`` and never assert on timings.
"""
