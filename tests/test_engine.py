"""engine.train_step's reported values on a stand-in ViT whose logits are chosen by hand:
the rank-weighted loss, the per-patch losses put back at their patches, the masked-token
accuracy. Expected values come from torch's own cross-entropy on the chosen logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine
import utils
from masking_generator import MaskBatch

# 2 images of 4 patches, V = 3 tokens; masked: image 0 patch 1, image 1 patches 0 and 3
MASKS = torch.tensor([[False, True, False, False], [True, False, False, True]])
POSITIONS = [1, 4, 7]  # row-major, the x[masks] order
TARGETS = torch.tensor([0, 1, 1])  # the masked patches' tokens
LOGITS = torch.tensor([[2.0, 0.0, -1.0],   # argmax 0: right
                       [-0.5, 1.5, 0.0],   # argmax 1: right
                       [0.5, -1.0, 0.0]])  # argmax 0, token 1: wrong


class _TableViT(torch.nn.Module):
    """A stand-in ViT: each patch of the batch has its own logits row (a parameter), and
    the logits of the masked patches are those rows, in x[masks] order."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(8, 3)
        table[POSITIONS] = LOGITS
        self.table = torch.nn.Parameter(table)

    def forward(self, x: torch.Tensor, bool_masked_pos: torch.Tensor,
                masked_index: torch.Tensor | None = None) -> torch.Tensor:
        index = bool_masked_pos.reshape(-1).nonzero()[:, 0] if masked_index is None \
            else masked_index
        return self.table[index]


def _step(loss_weights: torch.Tensor | None = None) -> engine.StepOutput:
    tokens = torch.full((2, 4), 2)  # unmasked patches: token 2, never predicted
    tokens.view(-1)[POSITIONS] = TARGETS
    model = _TableViT()
    batch = MaskBatch(MASKS, torch.tensor(POSITIONS), loss_weights)
    return engine.train_step(model, torch.zeros(2, 3, 4, 4), tokens, batch,
                             torch.optim.SGD(model.parameters(), lr=0.1),
                             utils.make_grad_scaler("cpu", "none"))


def _ce() -> torch.Tensor:
    return F.cross_entropy(LOGITS, TARGETS, reduction="none")  # (3,), all different


def test_train_step_loss_uses_the_rank_weights():
    """With loss weights the loss is sum(w * CE) / sum(w) over the masked patches, not
    their plain mean; without them, the plain mean."""
    ce = _ce()
    assert len(set(ce.tolist())) == 3
    w = torch.tensor([4.0, 2.25, 1.0])  # (1 + q)^2 for q = 1, 0.5, 0
    out = _step(w)
    expected = (w * ce).sum() / w.sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(expected - ce.mean()) > 0.05  # the weights change the loss here
    assert _step(None).loss.item() == pytest.approx(ce.mean().item(), rel=1e-6)


def test_train_step_patch_losses_sit_at_their_patches():
    """The per-patch losses returned for the masking statistics: each masked patch's CE at
    its own position (in x[masks] order), 0 at the unmasked patches."""
    out = _step()
    torch.testing.assert_close(out.patch_losses[MASKS], _ce())
    assert out.patch_losses.shape == (2, 4) and (out.patch_losses[~MASKS] == 0).all()


def test_train_step_mlm_acc_counts_exact_token_predictions():
    """mlm_acc: the fraction of masked patches whose argmax token is their token: 2 of 3."""
    assert _step().mlm_acc.item() == pytest.approx(2 / 3, abs=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
def test_a_non_finite_gradient_with_a_finite_loss_fails_the_step(fused):
    """Without fp16's loss scaler nothing else catches a NaN gradient of a finite loss:
    the step fails and the weights stay as they were, with a plain optimiser (which reads
    the flag on the host) and with fused AdamW (which skips on the device)."""
    tokens = torch.full((2, 4), 2)
    tokens.view(-1)[POSITIONS] = TARGETS
    model = _TableViT()
    model.table.register_hook(lambda grad: grad * float("nan"))
    before = model.table.detach().clone()
    opt = (utils.build_optimizer(model, 0.1, 0.0, (0.9, 0.999), 1e-8, "cpu") if fused
           else torch.optim.SGD(model.parameters(), lr=0.1))
    out = engine.train_step(model, torch.zeros(2, 3, 4, 4), tokens,
                            MaskBatch(MASKS, torch.tensor(POSITIONS), None), opt,
                            utils.make_grad_scaler("cpu", "none"))
    assert torch.isfinite(out.loss) and bool(out.failed)
    assert torch.equal(model.table.detach(), before)
