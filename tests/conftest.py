import pytest
import torch

# The suite runs as 2 pytest-xdist workers on 2 cores: one intra-op thread per worker avoids
# oversubscription, which made forward passes up to 10x slower on busy machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Back to one thread after every test: a training run that asks for more leaves it set."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
