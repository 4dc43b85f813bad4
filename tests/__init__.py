import os
import sys

# OpenMP threads that sleep instead of spin while they wait: set here because conftest imports
# torch before textvae, and libgomp reads it when torch loads. The suite runs beside other work
# (CI's second process, a developer's editor), so it sleeps at once rather than spin briefly
# as textvae/__init__.py arranges for a user's commands.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
