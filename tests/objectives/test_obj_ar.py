"""The autoregressive objective against torch's cross-entropy, per modality."""

import torch
import torch.nn.functional as F

from sparsefusion.data.batch import IGNORE_INDEX
from sparsefusion.objectives.ar import ar_loss


def test_matches_cross_entropy_and_splits_by_target_modality():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 4] = IGNORE_INDEX
    tmod = torch.randint(0, 2, (2, 5), generator=g)
    tmod[0, 4] = -1
    out = ar_loss(logits, targets, tmod, num_modalities=2, z_loss=0.0)
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref)
    ce = F.cross_entropy(
        logits.view(-1, 11), targets.view(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    for m in range(2):
        sel = tmod.view(-1) == m
        torch.testing.assert_close(out.ce_sum_M[m].float(), ce[sel].sum())
        assert int(out.count_M[m]) == int(sel.sum())


def test_z_loss_term():
    logits = torch.randn(1, 3, 7)
    targets = torch.tensor([[1, 2, IGNORE_INDEX]])
    tmod = torch.tensor([[0, 0, -1]])
    a = ar_loss(logits, targets, tmod, num_modalities=1, z_loss=0.0)
    b = ar_loss(logits, targets, tmod, num_modalities=1, z_loss=1e-2)
    lse = torch.logsumexp(logits[0, :2], -1)
    torch.testing.assert_close(b.loss - a.loss, 1e-2 * (lse**2).mean())
