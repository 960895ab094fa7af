"""Benchmarks: the data pipeline, a whole trial and the search, each against its baseline,
measured side by side in one run.
"""
