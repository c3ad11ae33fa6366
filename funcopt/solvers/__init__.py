"""The linear-solver layer (in progress)."""
