import torch

# The suite runs as 2 pytest-xdist workers on 2 cores: one intra-op thread per worker avoids
# oversubscription, which made forward passes up to 10x slower on busy machines.
torch.set_num_threads(1)
