"""Lets `pytest bench/` collect the benchmark files (bench_*.py, check_*.py), which pytest's default test_*.py
pattern skips; files named on the command line are collected by pytest itself, so they are left alone here.
CUDA-only files skip on CPU with their reason; bench/bench_memory.py runs its small CPU variant (~1 minute)."""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith(("bench_", "check_")):
        if not parent.session.isinitpath(file_path):
            return pytest.Module.from_parent(parent, path=file_path)
    return None
