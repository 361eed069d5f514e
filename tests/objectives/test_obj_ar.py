"""The next-token objective against torch's cross-entropy, per modality, and its normalisation."""

import pytest
import torch
import torch.nn.functional as F

from sparsefusion.data.batch import IGNORE_INDEX, Batch
from sparsefusion.models.transformer import ModelConfig, ModelOutput
from sparsefusion.objectives.base import ObjectiveConfig, build_objective


def _batch(logits, targets, tmod):
    B, T = targets.shape
    zeros = torch.zeros(B, T, dtype=torch.long)
    return Batch(targets, targets, zeros, tmod, zeros, zeros)


def _objective(z_loss, modalities=("text", "image")):
    model = ModelConfig(
        arch="dense", vocab_size=11, modalities=list(modalities), dim=8, num_heads=2
    )
    return build_objective(ObjectiveConfig(z_loss=z_loss), model)


def _run(obj, logits, batch):
    inputs = obj.prepare(batch)
    out = obj.loss(ModelOutput(logits_BTV=logits), batch, inputs)
    out.counts = obj.counts(batch)
    return out


def test_matches_cross_entropy_and_splits_by_target_modality():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 4] = IGNORE_INDEX
    tmod = torch.randint(0, 2, (2, 5), generator=g)
    tmod[0, 4] = -1
    obj = _objective(0.0)
    out = _run(obj, logits, _batch(logits, targets, tmod))
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss(), ref)
    ce = F.cross_entropy(
        logits.view(-1, 11), targets.view(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    for m, name in enumerate(("text", "image")):
        sel = tmod.view(-1) == m
        s, c = out.logged[f"loss/{name}"]
        torch.testing.assert_close(s.float(), ce[sel].sum())
        assert int(c) == int(sel.sum())
    assert out.counts == {"targets": 9}


def test_z_loss_term():
    logits = torch.randn(1, 3, 7)
    targets = torch.tensor([[1, 2, IGNORE_INDEX]])
    tmod = torch.tensor([[0, 0, -1]])
    a = _run(_objective(0.0, ("text",)), logits, _batch(logits, targets, tmod))
    b = _run(_objective(1e-2, ("text",)), logits, _batch(logits, targets, tmod))
    lse = torch.logsumexp(logits[0, :2], -1)
    torch.testing.assert_close(b.loss() - a.loss(), 1e-2 * (lse**2).mean())


def test_global_normaliser_makes_two_halves_one_batch():
    """Sums over a shared count: two uneven halves give exactly the loss of the whole batch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    targets = torch.randint(0, 11, (2, 6), generator=g)
    targets[0, 2:] = IGNORE_INDEX  # the halves hold 2 and 6 valid targets
    tmod = torch.where(targets == IGNORE_INDEX, -1, 0)
    obj = _objective(1e-3)
    whole = _run(obj, logits, _batch(logits, targets, tmod)).loss()
    halves = [
        _run(obj, logits[i : i + 1], _batch(None, targets[i : i + 1], tmod[i : i + 1]))
        for i in range(2)
    ]
    total = {"targets": sum(h.counts["targets"] for h in halves)}
    torch.testing.assert_close(sum(h.loss(total) for h in halves), whole)
    # The mean of the halves' own means is not the batch's loss (the old accumulation).
    assert abs(float(sum(h.loss() for h in halves) / 2 - whole)) > 1e-3


def test_config_rejects_unknown_name_and_nonfinite_z_loss():
    with pytest.raises(ValueError, match="objective.name"):
        ObjectiveConfig(name="nope")
    with pytest.raises(ValueError, match="objective.z_loss"):
        ObjectiveConfig(z_loss=float("nan"))
