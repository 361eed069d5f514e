"""The real backend: ``sparsefusion.generate.Generator`` behind the server's model slots."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import TYPE_CHECKING

from sparsefusion.serve.params import FieldError, GenerateParams
from sparsefusion.serve.runs import RunInfo

if TYPE_CHECKING:
    from sparsefusion.generate import GenerationRequest, Generator, Sample


class EngineModel:
    """One loaded Generator; turns validated params into a ``GenerationRequest``.

    Args:
        generator: a loaded ``sparsefusion.generate.Generator``.
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.modes = list(generator.modes)

    def request(self, params: GenerateParams) -> GenerationRequest:
        """The engine request for ``params``, checked by the engine itself.

        Raises:
            FieldError: the engine refuses a field (422, naming it).
        """
        from sparsefusion.generate import GenerationRequest

        known = {f.name for f in fields(GenerationRequest)}
        values = {k: v for k, v in vars(params).items() if k in known}
        req = GenerationRequest(**values)
        try:
            req.validate(self.generator)
        except ValueError as e:
            raise FieldError(_field_named(str(e), known), str(e)) from None
        return req

    def generate(self, params: GenerateParams) -> list[Sample]:
        """Samples for one request (deterministic per seed)."""
        return self.generator.generate([self.request(params)])


def _field_named(message: str, known: set[str]) -> str:
    """The first request field a message names ("request" when none)."""
    words = re.findall(r"[A-Za-z_]+", message)
    return next((w for w in words if w in known), "request")


class GeneratorBackend:
    """Loads ``Generator.from_run(run, checkpoint=step)`` on the given device.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = device

    def load(self, run: RunInfo, step: int) -> EngineModel:
        from sparsefusion.generate import Generator

        return EngineModel(Generator.from_run(run.path, checkpoint=step, device=self.device))
