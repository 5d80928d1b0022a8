"""The simulator of the book's sample night, kept apart from the reduction pipeline.

``datared.sim.night`` writes the night (raw frames, catalogues, ground truth),
``datared.sim.sky`` makes its stars, atmosphere and PSF, ``datared.sim.instrument`` its
camera, and ``python -m datared.sim`` is the command line. The simulator may use the
pipeline modules of ``datared``; no pipeline module imports the simulator::

    from datared.sim import simulate_night
    simulate_night("sample-night", preset="small", seed=20240215)
"""

from datared.sim.instrument import Camera
from datared.sim.night import (
    ATMOSPHERE,
    DEFAULT_SEED,
    FORMER_GENERATORS,
    GENERATOR,
    POINTING,
    PRESETS,
    Preset,
    colour_of,
    frame_wcs,
    is_current_sample_night,
    is_sample_night,
    simulate_night,
    source_fingerprint,
    star_flux_adu,
)
from datared.sim.sky import Moffat

__all__ = [
    "ATMOSPHERE",
    "DEFAULT_SEED",
    "FORMER_GENERATORS",
    "GENERATOR",
    "POINTING",
    "PRESETS",
    "Camera",
    "Moffat",
    "Preset",
    "colour_of",
    "frame_wcs",
    "is_current_sample_night",
    "is_sample_night",
    "simulate_night",
    "source_fingerprint",
    "star_flux_adu",
]
