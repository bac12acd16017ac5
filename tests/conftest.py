"""Shared test set-up: the repo root on sys.path, and the process set-up the entry points make."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Before Paddle is imported anywhere: the CPU set-up of the entry points (threads, MKL's fast
# code path on AMD CPUs, Paddle flags), so the tests run the code as users run it. No restart:
# pytest is not one of our scripts.
import runtime  # noqa: E402

runtime.setup_process(restart=False)
