"""The compiled optimiser update (``model.compile_optimizer``): the same training as the eager one."""

import pytest
import torch
from conftest import compose_train
from torch._dynamo.utils import counters

from landmark_unet.lit.optimizer import compile_step
from landmark_unet.train import train

OPTIMISERS = {  # the update rules of conf/optim, with their schedulers
    "study_rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=1e-8, momentum=0.9), None),
    "adam_step": (lambda p: torch.optim.Adam(p, lr=1e-2),
                  lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)),
    "sgd_poly": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5),
                 lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=10, power=0.9)),
}


def train_steps(make_optimizer, make_scheduler, compiled: bool, steps: int = 5):
    """Parameters and learning rates after ``steps`` closure steps of a small network, each followed by a scheduler
    step. No bias before the BatchNorm: its gradient would be rounding noise, which Adam and RMSprop scale up to
    steps of the learning rate's size, different for any other order of summation."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 1, 1))
    optimizer = make_optimizer(net.parameters())
    if compiled:
        assert compile_step(optimizer) is optimizer
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    x = torch.randn(3, 2, 8, 8)
    rates, losses = [], []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = net(x).square().mean()
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(optimizer.step(closure)))
        if scheduler is not None:
            scheduler.step()
        rates.append(float(optimizer.param_groups[0]["lr"]))
    return [p.detach().clone() for p in net.parameters()], rates, losses


@pytest.mark.parametrize("name", OPTIMISERS)
def test_compiled_update_matches_the_eager_one(name):
    make_optimizer, make_scheduler = OPTIMISERS[name]
    counters.clear()
    compiled = train_steps(make_optimizer, make_scheduler, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the update did go through torch.compile
    eager = train_steps(make_optimizer, make_scheduler, compiled=False)
    for c, e in zip(compiled[0], eager[0]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-6)  # the scheduler drives the tensor rate
    assert compiled[2] == pytest.approx(eager[2], rel=1e-5)  # step returns the closure's loss
    if make_scheduler is not None:
        assert len(set(compiled[1])) == len(compiled[1])  # the rate really changed at every step


def test_a_compiled_optimisers_state_loads_into_an_eager_one():
    """A checkpoint of a run with ``model.compile_optimizer`` (tensor learning rates) resumes without it."""
    make_optimizer, make_scheduler = OPTIMISERS["adam_step"]
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimizer = compile_step(make_optimizer(net.parameters()))
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert torch.is_tensor(state["param_groups"][0]["lr"])
    eager = make_optimizer(net.parameters())
    eager.load_state_dict(state)
    before = net.weight.detach().clone()
    eager.step()
    assert not torch.equal(net.weight, before)


def test_compile_optimizer_trains_as_the_eager_update(tmp_path):
    """``model.compile_optimizer=true`` from the real config: a tiny run whose update went through torch.compile
    and whose per-epoch validation losses (of the weights it trained) match the same run's without it (sgd_poly:
    its scheduler changes the rate every epoch)."""
    tiny = ["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
            "model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
            "trainer.max_epochs=3", "optim=sgd_poly"]
    history = {}
    for flag in (True, False):
        counters.clear()
        cfg = compose_train(tiny + [f"model.compile_optimizer={str(flag).lower()}"], tmp_path / str(flag))
        metrics = train(cfg)
        assert (counters["stats"]["unique_graphs"] > 0) == flag
        history[flag] = metrics["history"]["val/loss"]
    assert len(history[True]) == 3
    assert history[True] == pytest.approx(history[False], rel=1e-4)
