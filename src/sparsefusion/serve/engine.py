"""The real backend: ``sparsefusion.generate.Generator`` behind the server's model slots."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
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

    def generate_batch(
        self, params: Sequence[GenerateParams], cancelled: Sequence[threading.Event]
    ) -> list[list[Sample] | Exception]:
        """Samples of every request, decoded together; an error in place of a refused request.

        Each sample is what the request gets alone (per-row seeds; row-wise sampling). A
        request the engine refuses gets its error; if the batch itself fails, every request is
        run alone so each gets its own result or error.
        """
        reqs: list[GenerationRequest | Exception] = []
        for p in params:
            try:
                reqs.append(self.request(p))
            except FieldError as e:
                reqs.append(e)
        ok = [i for i, r in enumerate(reqs) if not isinstance(r, Exception)]
        out: list[list[Sample] | Exception] = [r if isinstance(r, Exception) else [] for r in reqs]
        try:
            samples = self.generator.generate([reqs[i] for i in ok], [cancelled[i] for i in ok])
        except Exception:
            for i in ok:
                try:
                    out[i] = self.generator.generate([reqs[i]], [cancelled[i]])
                except Exception as e:
                    out[i] = e
            return out
        for s in samples:
            out[ok[s.request]].append(s)
        return out


def _field_named(message: str, known: set[str]) -> str:
    """The first request field a message names ("request" when none)."""
    words = re.findall(r"[A-Za-z_]+", message)
    return next((w for w in words if w in known), "request")


class GeneratorBackend:
    """Loads ``Generator.from_run(run, checkpoint=step)`` on the given device.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        step: the decode step (``Generator``'s ``step``).
    """

    def __init__(self, device: str = "auto", step: str = "auto") -> None:
        self.device, self.step = device, step

    def load(self, run: RunInfo, step: int) -> EngineModel:
        from sparsefusion.generate import Generator

        gen = Generator.from_run(run.path, checkpoint=step, device=self.device, step=self.step)
        return EngineModel(gen)
