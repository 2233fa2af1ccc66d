"""Shared test set-up: xdist workers share the machine's cores, so each uses one thread (two
workers with two threads each on two cores run several times slower)."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
