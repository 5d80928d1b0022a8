"""datared: helpers for the datared tutorial book (simulation, I/O, solvers, plotting)."""

__version__ = "0.1.0"
