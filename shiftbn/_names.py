"""Names the command line lists in its help: the strategy grammar and the built-in metrics.

Why: ``shiftbn matrix --help`` must answer without importing torch; this module imports nothing,
``shiftbn.adapt.spec`` takes ``GRAMMAR`` from here and a test checks ``METRIC_NAMES`` against the
metric table of ``shiftbn.evaluate.metrics``.
"""

GRAMMAR = ("source | precise | target | per-source | prior:N (N >= 0) | batch:B[:mixed] (B >= 2) | "
           "tent:S (S >= 0 steps) | stats:<source> | stats:*")

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "nll", "auroc", "ece", "mae", "r2")
