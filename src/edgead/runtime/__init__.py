"""What runs on the line: frame sources, privacy blurring, overlays and the live scoring loop."""

from edgead.runtime.privacy import PrivacyFilter
from edgead.runtime.sources import Frame, FrameSource, SourceError, open_source
from edgead.runtime.stream import FrameResult, StreamSummary, run_stream

__all__ = [
    "Frame",
    "FrameResult",
    "FrameSource",
    "PrivacyFilter",
    "SourceError",
    "StreamSummary",
    "open_source",
    "run_stream",
]
