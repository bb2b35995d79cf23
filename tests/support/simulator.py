"""The provider simulator for tests: see ``ops.launcher``."""

from ops.launcher import SimulatorHandle, run_simulator

__all__ = ["SimulatorHandle", "run_simulator"]
