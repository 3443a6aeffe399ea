"""Product-quantization codebooks for feature payloads (faiss), stored in the run folder.

A codebook is trained on the backbone features of the run's own training images (every feature-map
position is one C-dimensional vector), saved as safetensors (no pickle) beside the model, and named by
the first 8 bytes of its file's sha256. Edge and server each load their copy and every pq payload
carries the id, so a codebook that differs on the two sides is refused instead of decoding to garbage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load, save

from edgead.errors import EdgeadError, RunFolderError
from edgead.outputs import atomic_write_bytes

CODEBOOK_FILE = "pq_codebook.safetensors"
CODEBOOK_FORMAT = "edgead-pq"
DEFAULT_NBITS = 8
DEFAULT_SUB_DIM = 8  # dimensions per sub-quantizer: 152 channels -> 19 bytes per position at 8 bits
DEFAULT_MAX_VECTORS = 100_000
DEFAULT_MAX_IMAGES = 64


def default_subquantizers(channels: int, sub_dim: int = DEFAULT_SUB_DIM) -> int:
    """The number of sub-quantizers M: a divisor of ``channels`` giving sub-vectors closest to ``sub_dim``."""
    divisors = [m for m in range(1, channels + 1) if channels % m == 0]
    return min(divisors, key=lambda m: (abs(channels / m - sub_dim), -m))


class Codebook:
    """A trained faiss ProductQuantizer plus its id; ``encode`` [n, C] float -> codes, ``decode`` back."""

    def __init__(self, centroids: np.ndarray, nbits: int, file_bytes: bytes | None = None) -> None:
        m, ksub, dsub = centroids.shape
        if ksub != 1 << nbits:
            raise EdgeadError(f"a {nbits}-bit codebook has {1 << nbits} centroids per sub-quantizer, not {ksub}")
        self.m, self.nbits, self.dim = m, nbits, m * dsub
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.pq = faiss.ProductQuantizer(self.dim, m, nbits)
        faiss.copy_array_to_vector(self.centroids.ravel(), self.pq.centroids)
        self.file_bytes = file_bytes if file_bytes is not None else self.to_bytes()
        self.id = hashlib.sha256(self.file_bytes).digest()[:8]

    @property
    def id_hex(self) -> str:
        return self.id.hex()

    @property
    def code_size(self) -> int:
        return int(self.pq.code_size)

    @classmethod
    def train(cls, vectors: np.ndarray, m: int | None = None, nbits: int = DEFAULT_NBITS, seed: int = 0) -> Codebook:
        """k-means per sub-space (faiss), seeded; needs at least 2**nbits vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        m = m or default_subquantizers(dim)
        if dim % m:
            raise EdgeadError(f"{m} sub-quantizers do not divide {dim} channels: choose a divisor of {dim}")
        if not 1 <= nbits <= 12:
            raise EdgeadError(f"codebook bits must be 1..12, got {nbits}")
        if n < 1 << nbits:
            raise EdgeadError(f"{n} training vectors are too few for {1 << nbits} centroids: use fewer bits")
        if not np.isfinite(vectors).all():
            raise EdgeadError("the training features hold NaN or infinite values: cannot train a codebook")
        pq = faiss.ProductQuantizer(dim, m, nbits)
        pq.cp.seed = seed
        pq.cp.min_points_per_centroid = 1  # small runs have few vectors; faiss would only warn about it
        pq.verbose = False
        pq.train(vectors)
        centroids = faiss.vector_to_array(pq.centroids).reshape(m, 1 << nbits, dim // m)
        return cls(centroids, nbits)

    def to_bytes(self) -> bytes:
        metadata = {"format": CODEBOOK_FORMAT, "format_version": "1", "dim": str(self.dim),
                    "m": str(self.m), "nbits": str(self.nbits)}
        return save({"centroids": self.centroids}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "codebook") -> Codebook:
        """Parse and check a codebook file's bytes (safetensors only, shapes and values checked)."""
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, OSError) as exc:
            raise RunFolderError(f"{source} is not a readable safetensors codebook: {exc}") from None
        centroids = tensors.get("centroids")
        if set(tensors) != {"centroids"} or centroids is None or centroids.ndim != 3:
            raise RunFolderError(f"{source} is not an edgead PQ codebook (expected one 3D 'centroids' tensor)")
        ksub = centroids.shape[1]
        nbits = ksub.bit_length() - 1
        if ksub < 2 or ksub != 1 << nbits or nbits > 12 or min(centroids.shape) < 1:
            raise RunFolderError(f"{source}: {ksub} centroids per sub-quantizer is not a power of two in 2..4096")
        if centroids.dtype != np.float32 or not np.isfinite(centroids).all():
            raise RunFolderError(f"{source}: centroids must be finite float32 values")
        return cls(centroids, nbits, file_bytes=bytes(data))

    @property
    def sha256(self) -> str:
        """The file's sha256 (hex): what the run's config.json and the edge folder's features.onnx record."""
        return hashlib.sha256(self.file_bytes).hexdigest()

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.file_bytes)

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        path = Path(path)
        if not path.is_file():
            raise RunFolderError(f"PQ codebook {path} does not exist: train it with edgead.edge.pq.train_codebook")
        return cls.from_bytes(path.read_bytes(), str(path))

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """[n, C] float -> codes [n, code_size] uint8."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EdgeadError(f"the codebook encodes {self.dim}-dimensional vectors, got shape {vectors.shape}")
        return self.pq.compute_codes(vectors)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [n, code_size] uint8 -> [n, C] float32 (every code value is a valid centroid index)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise EdgeadError(f"the codebook decodes {self.code_size}-byte codes, got shape {codes.shape}")
        return self.pq.decode(codes)


def load_run_codebook(run_dir: str | Path) -> Codebook | None:
    """The run folder's codebook, or None when it has none."""
    from edgead.runs import read_config

    path = Path(run_dir) / CODEBOOK_FILE
    recorded = read_config(run_dir).extra.get("codebook_sha256")
    if not path.exists():
        if recorded:
            raise RunFolderError(f"{run_dir} lost its PQ codebook {CODEBOOK_FILE}: restore it or train it again")
        return None
    codebook = Codebook.load(path)
    if codebook.sha256 != recorded:
        raise RunFolderError(
            f"{path} is not the codebook recorded in {run_dir}/config.json (changed, damaged or copied from "
            "another run): train it again with `edgead fit --pq-codebook`"
        )
    return codebook


def _training_samples(config, dataset: str | Path | None) -> list:
    from edgead.data.datasets import open_dataset, split_validation

    root = dataset or config.extra.get("dataset")
    if not root or not Path(root).is_dir():
        raise EdgeadError(
            f"the run's dataset ({root}) is not on this machine: pass the dataset its training images come from"
        )
    train = open_dataset(root).train
    if dataset is None and "validation_fraction" in config.extra:
        train, _ = split_validation(train, fraction=config.extra["validation_fraction"],
                                    seed=config.extra.get("seed", 0))
    return train


def sample_vectors(
    batches, n_images: int, max_vectors: int = DEFAULT_MAX_VECTORS, seed: int = 0
) -> np.ndarray:
    """Up to ``max_vectors`` feature vectors [n, C], the same seeded share of positions from each image."""
    rng = np.random.default_rng(seed)
    chosen = []
    for features in batches:
        b, c, h, w = features.shape
        per_image = min(h * w, max(1, -(-max_vectors // max(n_images, 1))))
        vectors = features.detach().float().permute(0, 2, 3, 1).reshape(b, h * w, c).numpy()
        for image in vectors:
            chosen.append(image[rng.choice(h * w, per_image, replace=False)])
    if not chosen:
        raise EdgeadError("no training features to train a codebook on")
    return np.concatenate(chosen)[:max_vectors]


def train_codebook(
    run_dir: str | Path,
    pipeline=None,
    samples: Sequence | None = None,
    dataset: str | Path | None = None,
    m: int | None = None,
    nbits: int = DEFAULT_NBITS,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_vectors: int = DEFAULT_MAX_VECTORS,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> Codebook:
    """Train the PQ codebook of a run on its training images' features and save it in the run folder.

    ``pipeline`` and ``samples`` default to the run's own (loaded from the folder; the training split
    of the dataset it was fitted on, validation images left out). At most ``max_images`` images, spread
    evenly, go through the backbone. With fewer than ``2**nbits`` vectors (a tiny dataset) fewer bits are
    used; the file records its own. Written atomically to ``RUN/pq_codebook.safetensors``.
    """
    from edgead.inference import iter_features
    from edgead.runs import load_run, read_config, update_config

    run_dir = Path(run_dir)
    if pipeline is None:
        pipeline, config = load_run(run_dir)
    else:
        config = read_config(run_dir)
    if samples is None:
        samples = _training_samples(config, dataset)
    samples = list(samples)
    if not samples:
        raise EdgeadError("no training images to train a codebook on")
    if len(samples) > max_images:
        keep = np.linspace(0, len(samples) - 1, max_images).round().astype(int)
        samples = [samples[i] for i in keep]
    with torch.no_grad():
        batches = iter_features(pipeline, samples, batch_size=batch_size, progress=progress, desc="codebook")
        vectors = sample_vectors(batches, len(samples), max_vectors, seed)
    if len(vectors) < 2:
        raise EdgeadError(f"{len(vectors)} feature vector(s) are too few to train a codebook: use more images")
    nbits = min(nbits, len(vectors).bit_length() - 1)  # a tiny dataset gets fewer centroids, never an error
    codebook = Codebook.train(vectors, m=m, nbits=nbits, seed=seed)
    codebook.save(run_dir / CODEBOOK_FILE)
    extra = {**config.extra, "codebook_sha256": codebook.sha256}
    update_config(run_dir, config.model_copy(update={"extra": extra}))  # the codebook joins the run's manifest
    return codebook
