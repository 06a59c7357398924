import pytest
import torch

# One thread: the tests use tiny tensors, where a second OpenMP thread only adds synchronisation, and on a
# busy 2-core machine a preempted peer thread stalls every small convolution (measured: 12 vs 313 img/s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
