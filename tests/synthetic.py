"""Synthetic star fields for the unit tests and benchmarks of the photometry (not the simulator).

The sample night (``datared.sim``) simulates a whole night with Moffat stars, a real
instrument and the atmosphere; the unit tests need something much smaller whose truth is
exact: Gaussian stars, integrated over each pixel, on a flat sky, with Poisson and read noise.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table
from scipy.special import erf

#: FWHM of a Gaussian in units of its sigma.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def synthetic_star_field(shape: tuple[int, int] = (256, 256), n_stars: int = 50,
                         fwhm_pix: float = 3.5, sky_adu: float = 200.0,
                         gain_e_per_adu: float = 1.0, read_noise_e: float = 5.0,
                         flux_range_adu: tuple[float, float] = (2e3, 2e5), margin: float = 8.0,
                         seed: int = 0, noise: bool = True) -> tuple[np.ndarray, Table]:
    """A noisy image of Gaussian stars on a flat sky, for unit tests and benchmarks.

    Returns ``(image, stars)`` with ``stars`` columns ``x``, ``y`` (pixels) and ``flux`` (ADU).

    Parameters
    ----------
    shape : image shape (ny, nx), pixels.
    n_stars : number of stars.
    fwhm_pix : Gaussian FWHM, pixels.
    sky_adu : sky level, ADU per pixel.
    gain_e_per_adu : gain for the Poisson noise, electrons per ADU.
    read_noise_e : read noise, electrons.
    flux_range_adu : range of total star fluxes (log-uniform), ADU.
    margin : minimum distance of a star from the edges, pixels.
    seed : random seed.
    noise : add Poisson and read noise.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(margin, nx - 1 - margin, n_stars)
    y = rng.uniform(margin, ny - 1 - margin, n_stars)
    flux = np.exp(rng.uniform(*np.log(flux_range_adu), n_stars))
    sigma = fwhm_pix / SIGMA_TO_FWHM
    image = np.full(shape, float(sky_adu))
    half = int(math.ceil(5 * sigma))
    for xc, yc, f in zip(x, y, flux, strict=True):
        x0, x1 = max(int(xc) - half, 0), min(int(xc) + half + 2, nx)
        y0, y1 = max(int(yc) - half, 0), min(int(yc) + half + 2, ny)
        # Pixel-integrated Gaussian (error functions), so fluxes are exact.
        ex = np.arange(x0, x1 + 1) - 0.5 - xc
        ey = np.arange(y0, y1 + 1) - 0.5 - yc
        px = np.diff(0.5 * erf(ex / (math.sqrt(2) * sigma)))
        py = np.diff(0.5 * erf(ey / (math.sqrt(2) * sigma)))
        image[y0:y1, x0:x1] += f * np.outer(py, px)
    if noise:
        electrons = rng.poisson(np.clip(image, 0, None) * gain_e_per_adu).astype(float)
        electrons += rng.normal(0.0, read_noise_e, shape)
        image = electrons / gain_e_per_adu
    return image.astype(np.float32), Table({"x": x, "y": y, "flux": flux})
