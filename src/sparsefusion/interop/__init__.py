"""Hugging Face interoperability: import Llama/Qwen2/Mistral checkpoints, start a MoT from a text
LLM (``init.from_hf``), export runs as Hugging Face folders.

Nothing here is imported by the core at module import time; ``transformers`` and
``huggingface_hub`` (the ``hf`` extra) are only needed by export to the Hub format and by tests.
"""
