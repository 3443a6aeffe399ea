"""edgead: visual anomaly detection for edge hardware."""

# torch before faiss, whatever the caller imports next: the two ship their own OpenMP runtimes, and with
# faiss loaded first PatchCore's kNN search ran 50% slower on 2 cores (12.1 against 8.2 ms per image,
# transistor; docs/results/patchcore_knn.md). Every edgead module imports torch anyway.
import torch  # noqa: F401  isort: skip

__version__ = "0.1.0"
