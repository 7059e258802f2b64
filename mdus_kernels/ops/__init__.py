"""One module per op: its Triton kernels, launchers and torch.library registration."""
