"""Shared test set-up: the repo root on sys.path, and the env variables the entry points set."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Before Paddle is imported anywhere: MKL's fast code path on AMD CPUs (DESIGN.md section 6).
os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
