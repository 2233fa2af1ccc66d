"""Shared test set-up: xdist workers share the machine's cores, so each uses one thread (two
workers with two threads each on two cores run several times slower); Ctrl-C as a terminal gives it."""
import os
import signal

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# A test run started as a background job of a non-interactive shell (`make test &`, a CI step run in the
# background) inherits SIGINT ignored (POSIX: asynchronous commands ignore it), and so does every run a test
# starts (an ignored signal stays ignored across exec; `ldm train` then keeps it ignored, as under nohup): the
# Ctrl-C tests saw nothing and failed. They get a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
