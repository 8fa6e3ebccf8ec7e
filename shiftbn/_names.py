"""Names the command line lists in its help: the strategy grammar and the built-in metrics.

Why: ``shiftbn matrix --help`` must answer without importing torch; this module imports nothing,
``shiftbn.adapt.spec`` takes ``GRAMMAR`` from here and a test checks ``METRIC_NAMES`` against the
metric table of ``shiftbn.evaluate.metrics``.
"""

GRAMMAR = ("ema | precise | target | per-source | prior:N[:B] (N >= 0; each test batch of B (default: 64)) | "
           "prior:N@n | prior:N@all (few-shot: n calibration samples) | batch:B[:mixed] (B >= 1) | tent | "
           "tent-episodic (online, batches of 64; tent:all adapts every BN layer, BatchNorm1d/3d too) | "
           "tent-offline:S (S >= 0 steps) | stats:<source> | stats:* (every "
           "source); append :k=K to prior:N[:B], batch:B[:mixed], tent, tent-episodic to score K seeded groupings of "
           "the test samples (default: 5)")

STATS_LABELS = ("ema", "precise", "batch", "mixed-batch")
"""``stats_source`` labels of statistics that are no source's; no source may be named so."""
STATS_LABEL_PREFIXES = ("prior:",)
"""Prefixes of such labels (``prior:16``, ``prior:16@32``); no source name may start with one."""

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "nll", "auroc", "ece", "mae", "r2", "coverage90", "dice",
                "iou", "hd95", "asd")
