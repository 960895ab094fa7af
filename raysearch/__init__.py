"""raysearch: distributed hyperparameter and ensemble search for radiograph classification.

Stages: data (manifest, split) -> cache (decode once) -> train (one trial) -> tune (many trials)
-> ensemble (selection, inference, study aggregation) -> report (Parquet, Rich).
"""

__version__ = "0.2.0"
