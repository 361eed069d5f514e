"""Objectives: a registry keyed by ``objective.name`` (see ``base.py``)."""

from sparsefusion.objectives import (
    ar,  # noqa: F401  (registers "ar")
    transfusion,  # noqa: F401  (registers "transfusion")
)
