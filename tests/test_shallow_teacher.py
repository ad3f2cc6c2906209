"""The two-layer ReLU student (models/shallow.py) and the teacher–student sphere data (data/teacher.py)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_lazy.data.teacher import (
    FreshTeacherSamples,
    Teacher,
    TeacherStudentDataModule,
    make_teacher_dataset,
    resolve_dtype,
    sample_sphere,
)
from lightning_lazy.models.shallow import TwoLayerReLU, resolve_output_scale

# ----------------------------------------------------------------------------------------------------
# sphere sampling and the teacher


def test_sample_sphere_is_uniform_on_the_unit_sphere():
    g = torch.Generator().manual_seed(0)
    x = sample_sphere(20000, 4, g, dtype=torch.float64)
    assert x.shape == (20000, 4) and x.dtype == torch.float64
    torch.testing.assert_close(x.norm(dim=1), torch.ones(20000, dtype=torch.float64))
    # Uniform on S^{d-1}: mean 0 and second moment I/d (rotation invariance); 20000 samples give ~1% error.
    assert x.mean(0).abs().max() < 0.03
    torch.testing.assert_close(x.T @ x / 20000, torch.eye(4, dtype=torch.float64) / 4, atol=0.015, rtol=0)


def test_sample_sphere_is_seeded_and_checks_arguments():
    a = sample_sphere(5, 3, torch.Generator().manual_seed(1))
    b = sample_sphere(5, 3, torch.Generator().manual_seed(1))
    c = sample_sphere(5, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_sphere(0, 3)
    with pytest.raises(ValueError, match="unknown dtype"):
        sample_sphere(2, 3, dtype="int8")
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int64)


def test_teacher_has_unit_neurons_alternating_signs_and_no_parameters():
    teacher = Teacher(7, seed=3)
    a, b = teacher.input_weights, teacher.output_weights
    assert a.shape == (3, 7) and b.tolist() == [1.0, -1.0, 1.0]
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    assert list(teacher.parameters()) == []  # never trained
    x = sample_sphere(11, 7, torch.Generator().manual_seed(0))
    expected = sum(b[j] * torch.clamp(x @ a[j], min=0) for j in range(3)).unsqueeze(1)
    torch.testing.assert_close(teacher(x), expected)
    assert not torch.equal(Teacher(7, seed=4).input_weights, a)


def test_teacher_accepts_given_directions_and_signs_and_rejects_bad_ones():
    teacher = Teacher(2, directions=torch.tensor([[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]]), signs=[-1, -1, 1])
    torch.testing.assert_close(teacher.input_weights[2], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert teacher.output_weights.tolist() == [-1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="each \\+1 or -1"):
        Teacher(2, signs=[1, 0.5, -1])
    with pytest.raises(ValueError, match="shape \\[n_neurons, d\\]"):
        Teacher(2, directions=torch.ones(3, 3))
    with pytest.raises(ValueError, match="zero row"):
        Teacher(2, directions=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"inputs of shape \[N, 2\]"):
        teacher(torch.ones(4, 3))


def test_fixed_dataset_is_seeded_and_labelled_by_the_teacher():
    teacher = Teacher(5, seed=0, dtype="float64")
    x, y = make_teacher_dataset(teacher, 50, seed=1).tensors
    assert x.dtype == y.dtype == torch.float64 and y.shape == (50, 1)
    torch.testing.assert_close(y, teacher(x))
    assert torch.equal(x, make_teacher_dataset(teacher, 50, seed=1).tensors[0])
    assert not torch.equal(x, make_teacher_dataset(teacher, 50, seed=2).tensors[0])


def test_fresh_stream_draws_new_samples_every_batch_and_epoch_reproducibly():
    teacher = Teacher(4, seed=0)
    stream = FreshTeacherSamples(teacher, batch_size=8, steps_per_epoch=3, seed=5)
    epoch1, epoch2 = list(stream), list(stream)
    assert len(stream) == 3 and len(epoch1) == len(epoch2) == 3
    xs = torch.cat([x for x, _ in epoch1 + epoch2])
    assert torch.unique(xs, dim=0).shape[0] == 48  # no sample is ever repeated
    for x, y in epoch1:
        assert x.shape == (8, 4) and y.shape == (8, 1)
        torch.testing.assert_close(y, teacher(x))
    again = FreshTeacherSamples(teacher, batch_size=8, steps_per_epoch=3, seed=5)
    assert torch.equal(next(iter(again))[0], epoch1[0][0])  # same seed, same stream


def test_fresh_stream_splits_its_epoch_among_workers():
    stream = FreshTeacherSamples(Teacher(3), batch_size=4, steps_per_epoch=5, seed=0)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == 5
    assert torch.unique(torch.cat([x for x, _ in batches]), dim=0).shape[0] == 20


# ----------------------------------------------------------------------------------------------------
# the DataModule


def test_datamodule_full_batch_gradient_descent_sees_the_whole_set_every_step():
    dm = TeacherStudentDataModule(d=3, n_train=10, n_val=6, n_test=4, batch_size=None, steps_per_epoch=4,
                                  dtype="float64")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    full = dm.train_set.tensors[0]
    for x, y in batches:
        assert x.shape == (10, 3) and x.dtype == torch.float64
        # Same rows (in some order): an exact full-batch gradient.
        assert torch.equal(torch.sort(x, dim=0).values, torch.sort(full, dim=0).values)
    (xv, yv), = list(dm.val_dataloader())
    assert xv.shape == (6, 3) and yv.shape == (6, 1)
    assert next(iter(dm.test_dataloader()))[0].shape == (4, 3)
    # Splits are distinct draws, and the same seed rebuilds them identically.
    assert not torch.equal(xv, full[:6])
    dm2 = TeacherStudentDataModule(d=3, n_train=10, n_val=6, n_test=4, batch_size=None, dtype="float64")
    dm2.setup()
    assert torch.equal(dm2.train_set.tensors[0], full)


def test_datamodule_loaders_also_collate_samples_drawn_by_index():
    # The LazyTrainingMonitor draws its default probe as loader.collate_fn([dataset[i], ...]).
    dm = TeacherStudentDataModule(d=3, n_train=10, n_val=4, batch_size=4)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = loader.collate_fn([loader.dataset[i] for i in (0, 2, 3)])
        assert x.shape == (3, 3) and y.shape == (3, 1)
        torch.testing.assert_close(x, loader.dataset.tensors[0][[0, 2, 3]])


def test_datamodule_minibatches_and_fresh_mode():
    dm = TeacherStudentDataModule(d=3, n_train=10, n_val=0, n_test=0, batch_size=4)
    assert len(dm.train_dataloader()) == 3 and dm.val_dataloader() == []
    fresh = TeacherStudentDataModule(d=3, n_train=10, n_val=2, n_test=2, batch_size=4, fresh=True, steps_per_epoch=7)
    loader = fresh.train_dataloader()
    first, second = list(loader), list(loader)
    assert len(first) == 7 and not torch.equal(first[0][0], second[0][0])
    torch.testing.assert_close(first[0][1], fresh.teacher(first[0][0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d": 0}, "d must be a positive integer"),
        ({"n_train": 10, "batch_size": 20}, "exceeds n_train"),
        ({"n_val": -1}, "n_val must be a non-negative integer"),
        ({"dtype": "half-precision"}, "unknown dtype"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive integer"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TeacherStudentDataModule(**kwargs)


class _Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TwoLayerReLU(4, 16, tau=0.5, seed=0)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x) - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", 0.5 * (self(x) - y).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)


def test_datamodule_trains_a_student_in_a_trainer():
    dm = TeacherStudentDataModule(d=4, n_train=64, n_val=64, n_test=0, batch_size=None, steps_per_epoch=50, seed=1)
    model = _Regressor()
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    x_val, y_val = dm.val_dataloader().dataset.tensors
    before = 0.5 * (model(x_val) - y_val).pow(2).mean().item()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 200
    assert trainer.callback_metrics["val_loss"].item() < 0.5 * before


# ----------------------------------------------------------------------------------------------------
# the student


def test_antisymmetric_init_gives_zero_output_but_a_generic_jacobian():
    net = TwoLayerReLU(5, 12, tau=1.7, seed=0, bias=True, dtype=torch.float64)
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Zero up to rounding: the mirrored halves cancel term by term (the matmul's summation order is free).
    hidden = net.act(net.hidden(x)).abs() @ net.output.weight.abs().T * net.scale
    assert (net(x).abs() <= 1e-14 * hidden).all() and hidden.max() > 0
    a, b = net.neurons()
    assert torch.equal(a[:6], a[6:]) and torch.equal(b[:6], -b[6:])
    assert torch.equal(net.hidden.bias[:6], net.hidden.bias[6:])
    net(x).sum().backward()
    # Output-weight gradients are relu(a_j·x) summed: nonzero, so the model can move away from 0.
    assert net.output.weight.grad.abs().sum() > 0


def test_init_scale_output_scale_and_formula():
    m, d, tau = 4000, 3, 0.3
    net = TwoLayerReLU(d, m, tau=tau, antisymmetric=False, output_scale="1/m", seed=1, dtype=torch.float64)
    a, b = net.neurons()
    assert abs(a.std().item() / tau - 1) < 0.03 and abs(b.std().item() / tau - 1) < 0.05
    assert net.scale == 1 / m and isinstance(net.act, nn.ReLU)
    x = torch.randn(7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(x), (torch.relu(x @ a.T) @ b / m).unsqueeze(1))
    assert TwoLayerReLU(d, 16).scale == 0.25  # default: 1/sqrt(m)
    assert resolve_output_scale("1/√m", 16) == 0.25 and resolve_output_scale(2.5, 16) == 2.5


def test_tau_acts_like_an_output_scale_tau_squared():
    # Bias-free two-layer ReLU is 2-homogeneous: weights λ·w give λ²·h(w), so the same seed at τ and 2τ
    # produces outputs in the ratio 4.
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    small = TwoLayerReLU(4, 10, tau=0.5, antisymmetric=False, seed=3, dtype=torch.float64)
    large = TwoLayerReLU(4, 10, tau=1.0, antisymmetric=False, seed=3, dtype=torch.float64)
    torch.testing.assert_close(large(x), 4 * small(x))


def test_neuron_positions_and_seeding():
    net = TwoLayerReLU(2, 6, seed=0)
    positions, signs = net.neuron_positions()
    a, b = net.neurons()
    torch.testing.assert_close(positions, b.abs().unsqueeze(1) * a)
    assert signs.tolist()[:3] == [-s for s in signs.tolist()[3:]]
    assert torch.equal(TwoLayerReLU(2, 6, seed=0).hidden.weight, net.hidden.weight)
    assert not torch.equal(TwoLayerReLU(2, 6, seed=1).hidden.weight, net.hidden.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 5}, "m must be even"),
        ({"tau": 0.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"output_scale": "1/m^2"}, "unknown output_scale"),
        ({"output_scale": -1.0}, "positive finite"),
        ({"d": 0}, "d must be a positive integer"),
    ],
)
def test_student_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoLayerReLU(**{"d": 2, "m": 4, **kwargs})


def test_student_rejects_wrong_input_dimension():
    with pytest.raises(ValueError, match=r"expected \[N, 3\]"):
        TwoLayerReLU(3, 4)(torch.ones(2, 5))
