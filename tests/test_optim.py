import pytest
import torch
from transformers import get_scheduler

from lm.optim import build_optimizer, lr_factor, parameter_groups
from lm.config import SCHEDULES, Config


def test_no_weight_decay_on_biases_and_norm_weights_and_fresh_params_get_their_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = parameter_groups(model, lr=1e-5, weight_decay=0.1, new_params=frozenset({"2.weight", "2.bias"}),
                              new_lr=1e-3)
    by_name = {n: (g["weight_decay"], g["lr"]) for g in groups for n in g["names"]}
    assert by_name == {"0.weight": (0.1, 1e-5), "0.bias": (0.0, 1e-5), "1.weight": (0.0, 1e-5),
                       "1.bias": (0.0, 1e-5), "2.weight": (0.1, 1e-3), "2.bias": (0.0, 1e-3)}
    optimizer = build_optimizer(groups, Config.for_task("clm"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_is_transformers_schedule_of_that_name(kind, warmup):
    lr = 3e-4  # polynomial decays to an absolute 1e-7, so its factor depends on the peak
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=30)
    for step in range(33):
        assert lr * lr_factor(step, 30, warmup, kind, lr) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12,
                                                                        abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_constant_has_no_warmup_and_constant_with_warmup_has():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 2, "constant_with_warmup") for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
