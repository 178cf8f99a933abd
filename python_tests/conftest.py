"""Shared test fixtures: devices, seeding, poisoned allocations."""

import pytest
import torch

import vlcore

#: Every device the suite runs on: the CPU reference always, CUDA when the build and the machine have it.
DEVICES = ["cpu"] + (["cuda"] if vlcore.cuda_available() and torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned():
    """Make every uninitialised allocation (at::empty inside the kernels too) come back filled with NaN
    or the dtype's max value, so a kernel that forgets to write an output element fails the test.

    torch fills only while deterministic algorithms are on, so this fixture turns them on: an op whose
    deterministic switch follows that global (attention's backward) must be given the switch explicitly by
    its tests, once per path, or the other path would never be tested."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


def random_tensor(shape, dtype, device):
    """Random values of any dtype, for ops that move bytes."""
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    return torch.randint(-100, 100, shape, device=device).to(dtype)
