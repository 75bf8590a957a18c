"""Experiment configs, the grid runner and its executors (sits on top of the library)."""
