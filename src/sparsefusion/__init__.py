"""sparsefusion: early-fusion mixed-modal pre-training with modality-aware sparsity."""

__version__ = "0.1.0"
