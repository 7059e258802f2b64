"""Pure-PyTorch references. Each module's docstrings are the specification of its op."""
