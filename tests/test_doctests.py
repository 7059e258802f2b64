"""The examples in the docstrings of mdus and mdus_kernels run and print what they show (those that need a model
or data files are marked ``+SKIP``)."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import mdus
import mdus_kernels

MODULES = sorted(m.name for pkg in (mdus, mdus_kernels)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                 if not m.name.endswith("__main__") and m.name != "mdus_kernels._C")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
