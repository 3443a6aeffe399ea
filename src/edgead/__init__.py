"""edgead: visual anomaly detection for edge hardware."""

__version__ = "0.1.0"
