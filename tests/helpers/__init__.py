"""Helpers shared by test modules: processes, training runs, simulated hosts."""
