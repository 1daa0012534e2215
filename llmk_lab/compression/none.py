"""No compression: the dense baseline."""
from dataclasses import dataclass

from llmk_lab.compression import COMPRESSION, CompressionMethod


@dataclass
class NoCompressionConfig:
    method: str = "none"


@COMPRESSION.register("none", config=NoCompressionConfig)
class NoCompression(CompressionMethod):
    dense_reference = None  # nothing is compressed: no reference to measure against
