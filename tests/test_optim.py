import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from lm.optim import build_optimizer, lr_factor, parameter_groups
from lm.config import Config


def test_no_weight_decay_on_biases_and_norm_weights_and_fresh_params_get_their_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = parameter_groups(model, lr=1e-5, weight_decay=0.1, new_params=frozenset({"2.weight", "2.bias"}),
                              new_lr=1e-3)
    by_name = {n: (g["weight_decay"], g["lr"]) for g in groups for n in g["names"]}
    assert by_name == {"0.weight": (0.1, 1e-5), "0.bias": (0.0, 1e-5), "1.weight": (0.0, 1e-5),
                       "1.bias": (0.0, 1e-5), "2.weight": (0.1, 1e-3), "2.bias": (0.0, 1e-3)}
    optimizer = build_optimizer(groups, Config.for_task("clm"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6


@pytest.mark.parametrize("kind, reference", [("linear", get_linear_schedule_with_warmup),
                                             ("cosine", get_cosine_schedule_with_warmup)])
def test_lr_factor_matches_the_transformers_schedules(kind, reference):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = reference(optimizer, num_warmup_steps=5, num_training_steps=30)
    for step in range(32):
        assert lr_factor(step, 30, 5, kind) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_constant_schedule_after_warmup():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
