import os
import sys

# OpenMP threads that sleep instead of spin while they wait (textvae/__init__.py does the same):
# set here because conftest imports torch before textvae, and libgomp reads it when torch loads.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
