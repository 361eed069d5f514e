"""Generation: a KV-cached engine, constrained mixed-modal decoding, guidance, output folders.

from sparsefusion.generate import Generator, GenerationRequest, write_samples
gen = Generator.from_run("runs/default")
samples = gen.generate([GenerationRequest(prompt="a red circle", mode="text_to_image")])
write_samples(samples, "samples/")
"""

from sparsefusion.generate.constraints import MODES
from sparsefusion.generate.engine import Decoder, MissingAuxRouters
from sparsefusion.generate.generator import Generator
from sparsefusion.generate.kv_cache import KVCache
from sparsefusion.generate.output import Sample, Segment, write_samples
from sparsefusion.generate.request import GenerationRequest
from sparsefusion.generate.sampling import SamplingParams
from sparsefusion.generate.span_samplers import DiffusionSettings

__all__ = [
    "DiffusionSettings",
    "MODES",
    "Decoder",
    "GenerationRequest",
    "Generator",
    "KVCache",
    "MissingAuxRouters",
    "Sample",
    "SamplingParams",
    "Segment",
    "write_samples",
]
