"""The loss module's fused head + cross-entropy, beyond what test_equivalence compares with the plain head."""

import pytest
import torch

from conftest import tiny_model
from lm.data import IGNORE
from lm.losses import LinearCrossEntropy, Workspace


def test_the_fused_head_refuses_a_second_backward_instead_of_scaling_twice():
    # its gradients are made in the forward and scaled in place in backward: they serve one backward
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    loss = LinearCrossEntropy.apply(hidden, weight, None, labels, torch.float32, Workspace())
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    assert torch.equal(weight.grad, first)


def test_a_batch_without_labels_adds_nothing(tokenizer):
    # what a rank with no examples in an epoch's short last step runs (lm.train.epoch_batches)
    from lm.losses import TokenLoss

    model = tiny_model("clm", tokenizer)
    ids = torch.randint(5, 1000, (1, 16))
    loss = TokenLoss(model)(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
