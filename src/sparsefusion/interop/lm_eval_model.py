"""An lm-evaluation-harness model for sparsefusion runs (``--model sparsefusion``).

Importing this module registers ``SparsefusionLM`` under the name ``sparsefusion``. From Python::

    import lm_eval, sparsefusion.interop.lm_eval_model  # noqa: F401 (registers the model)
    lm_eval.simple_evaluate(model="sparsefusion", model_args="run=runs/mot", tasks=[...])

From the shell (the harness has no plugin discovery, so this module registers, then runs its
command line): ``python -m sparsefusion.interop.lm_eval_model --model sparsefusion
--model_args run=RUN_DIR --batch_size 8 --tasks hellaswag`` (batch size and device as the
harness's own flags, not in ``--model_args``).

Text is encoded as the run encodes documents: ``<bos>`` then the text ids. Log-likelihoods are
over the whole unified vocabulary (image codes and sentinels included). ``generate_until`` decodes
through the run's KV-cached engine (``generate/``), every request of one batch in one decode;
stop strings cut the text afterwards (``<eos>`` stops a row early).

Shape legend: B = rows, T = positions, V = unified vocabulary.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sparsefusion.data.documents import TEXT
from sparsefusion.interop.forward import text_inputs

log = logging.getLogger("sparsefusion")


@register_model("sparsefusion")
class SparsefusionLM(LM):
    """A trained run, for the harness.

    Args:
        run: the run folder.
        checkpoint: checkpoint step (default: the newest valid one).
        device: "cpu", "cuda", "auto", ...
        batch_size: rows per forward (and per decode).
        max_gen_toks: default generation budget.
    """

    def __init__(
        self,
        run: str,
        checkpoint: int | None = None,
        device: str = "cpu",
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        **_ignored: Any,
    ):
        super().__init__()
        from sparsefusion.generate.generator import Generator

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("lm-eval: device=%s but CUDA is not available; using the CPU", device)
            device = "cpu"  # the harness's command line defaults to cuda:0
        self.gen = Generator.from_run(run, None if checkpoint is None else int(checkpoint), device)
        self.model, self.tok = self.gen.model, self.gen.tokenizer
        self.vocab = self.tok.vocab
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_len = self.model.cfg.max_seq_len

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> unified text ids (no ``<bos>``)."""
        return self.vocab.to_global(TEXT, self.tok.text.encode(text)) if text else []

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(``<bos>`` + context ids, continuation ids); trailing context spaces move to the
        continuation and the ids come from encoding the whole string (as the harness's HF model
        does, so merges across the boundary match the string's own tokenization)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary: encode separately
            whole = ctx + self.encode(continuation)
        return [self.vocab.bos_id, *ctx], whole[len(ctx) :]

    # ---- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy continuation) for id
        pairs; contexts are cut on the left to fit the model. Batched, longest first."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk]), strict=True):
                out[i] = result
        return out

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("lm-eval: an empty continuation has no log-likelihood")
            rows.append((ctx + cont)[-(self.max_len + 1) :][:-1])  # inputs: all but the last id
        T = max(len(r) for r in rows)
        ids_BT = torch.tensor([r + [self.vocab.pad_id] * (T - len(r)) for r in rows])
        logits_BTV = self.model(text_inputs(self.model, ids_BT)).logits_BTV
        logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1).cpu()
        results = []
        for b, ((_, cont), row) in enumerate(zip(pairs, rows, strict=True)):
            n = len(cont)
            logp_nV = logp_BTV[b, len(row) - n : len(row)]
            target_n = torch.tensor(cont)
            ll = logp_nV.gather(1, target_n[:, None]).sum().item()
            results.append((ll, bool((logp_nV.argmax(-1) == target_n).all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log p(continuation | context) and is-greedy, one per ``(context, continuation)``."""
        return self.score([self._pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of whole strings (after ``<bos>``), windowed to the model's length."""
        out = []
        for req in requests:
            ids = self.encode(req.args[0])
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(ids, self.vocab.bos_id, self.max_len, 1)
            ]
            out.append(sum(ll for ll, _ in self.score(windows)))
        return out

    # ---- generation ----------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut at the ``until`` strings."""
        from sparsefusion.generate.request import GenerationRequest

        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = kwargs.get("do_sample", False)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                reqs = [
                    GenerationRequest(
                        prompt=requests[i].args[0],
                        mode="text",
                        max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                        temperature=float(kwargs.get("temperature", 1.0)) if sampling else 0.0,
                        stop_ids=(self.vocab.eos_id,),
                        where=f"lm-eval request {i}",
                    )
                    for i in chunk
                ]
                for i, sample in zip(chunk, self.gen.generate(reqs), strict=True):
                    text = "".join(s.text or "" for s in sample.segments if s.modality == TEXT)
                    out[i] = _cut(text, until)
        return out


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
