"""fedistill: federated and privacy-aware dataset distillation.

The library (this package) never imports Flower; the Flower layer lives in the
top-level ``clients`` and ``strategies`` packages.
"""

__version__ = "0.1.0"
