"""The simulated camera (QHY600M binned 2x2): bias, dark current, flat field, read-out.

Images are indexed ``[y, x]`` (rows, columns), 0-based. A sub-frame of ``(ny, nx)`` pixels
is cut from the centre of the full ``(3194, 4788)`` sensor so that vignetting and optical
distortion are measured from the optical axis in both presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

FULL_SHAPE = (3194, 4788)
#: Binned pixel size, micrometres.
PIXEL_UM = 7.52


@dataclass
class Camera:
    """Detector parameters (all recorded in truth/params.json)."""

    gain_e_per_adu: float = 0.85
    read_noise_e: float = 3.6
    bias_level_adu: float = 300.0
    offset_setting: int = 30
    gain_setting: int = 26
    bias_column_rms_adu: float = 2.0
    bias_row_rms_adu: float = 1.0
    bias_pixel_rms_adu: float = 0.5
    bias_frame_jitter_adu: float = 0.3
    dark_current_e_per_s: float = 0.03
    hot_pixel_fraction: float = 5e-4
    hot_pixel_adu_per_s: tuple[float, float] = (1.0, 30.0)
    warm_pixel_fraction: float = 5e-3
    warm_pixel_adu_per_s: tuple[float, float] = (0.1, 1.0)
    prnu_rms: float = 0.006
    prnu_filter_rms: float = 0.002
    large_scale_rms: float = 0.008
    vignetting_at_corner: float = 0.12
    n_dust_common_full: int = 6
    n_dust_filter_full: int = 2
    dust_depth: tuple[float, float] = (0.02, 0.07)
    dust_radius_px: tuple[float, float] = (15.0, 45.0)
    cosmic_rate_per_cm2_s: float = 0.03
    cosmic_energy_e: tuple[float, float] = (800.0, 4000.0)
    saturation_adu: int = 65535
    nonlinearity_start_adu: float = 60000.0
    nonlinearity_slope: float = 0.7
    set_temp_c: float = -10.0
    extra: dict = field(default_factory=dict)

    @property
    def read_noise_adu(self) -> float:
        """Read noise in ADU."""
        return self.read_noise_e / self.gain_e_per_adu


def subframe_origin(shape: tuple[int, int]) -> tuple[int, int]:
    """(y0, x0) of a centred sub-frame of ``shape`` on the full sensor, pixels."""
    return (FULL_SHAPE[0] - shape[0]) // 2, (FULL_SHAPE[1] - shape[1]) // 2


def bias_map(shape: tuple[int, int], cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Noise-free bias (ADU): level + fixed row and column pattern + fixed pixel pattern."""
    ny, nx = shape
    cols = rng.normal(0, cam.bias_column_rms_adu, nx)
    rows = rng.normal(0, cam.bias_row_rms_adu, ny)
    ramp = np.linspace(-1.0, 1.0, nx)[None, :] * 1.5  # gentle left-right gradient
    pix = rng.normal(0, cam.bias_pixel_rms_adu, shape)
    return (cam.bias_level_adu + rows[:, None] + cols[None, :] + ramp + pix).astype(np.float32)


def dark_current_map(shape: tuple[int, int], cam: Camera,
                     rng: np.random.Generator) -> np.ndarray:
    """Dark current (ADU/s) including warm and hot pixels."""
    base = cam.dark_current_e_per_s / cam.gain_e_per_adu
    dark = base * (1.0 + rng.normal(0, 0.1, shape))
    n = dark.size
    for frac, (lo, hi) in ((cam.warm_pixel_fraction, cam.warm_pixel_adu_per_s),
                           (cam.hot_pixel_fraction, cam.hot_pixel_adu_per_s)):
        k = rng.poisson(frac * n)
        idx = rng.choice(n, size=k, replace=False)
        dark.flat[idx] = np.exp(rng.uniform(np.log(lo), np.log(hi), k))
    return np.clip(dark, 0, None).astype(np.float32)


def _smooth_noise(shape: tuple[int, int], rms: float, scale_px: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Large-scale random structure: noise on a coarse grid, smoothed and zoomed up."""
    step = max(4, int(scale_px // 4))
    coarse = rng.normal(0, 1, (shape[0] // step + 3, shape[1] // step + 3))
    coarse = ndimage.gaussian_filter(coarse, 2.0)
    coarse *= rms / coarse.std()
    yy = np.arange(shape[0]) / step + 1
    xx = np.arange(shape[1]) / step + 1
    return ndimage.map_coordinates(coarse, np.meshgrid(yy, xx, indexing="ij"), order=1)


def dust_motes(shape: tuple[int, int], cam: Camera, n: int,
               rng: np.random.Generator) -> list[dict]:
    """Random dust shadows (x, y, radius in pixels, fractional depth) inside the frame."""
    ny, nx = shape
    motes = []
    for _ in range(n):
        r = rng.uniform(*cam.dust_radius_px)
        motes.append({"x": float(rng.uniform(r, nx - r)), "y": float(rng.uniform(r, ny - r)),
                      "radius_px": float(r), "depth": float(rng.uniform(*cam.dust_depth))})
    return motes


def dust_shadow(shape: tuple[int, int], motes: list[dict]) -> np.ndarray:
    """Multiplicative transmission (<= 1) of out-of-focus dust donuts."""
    ny, nx = shape
    trans = np.ones(shape)
    for m in motes:
        r = m["radius_px"]
        y0, y1 = int(max(0, m["y"] - r - 5)), int(min(ny, m["y"] + r + 6))
        x0, x1 = int(max(0, m["x"] - r - 5)), int(min(nx, m["x"] + r + 6))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(xx - m["x"], yy - m["y"])
        disc = 1.0 / (1.0 + np.exp((d - r) / 1.5))
        # A donut: the telescope's central obstruction leaves a brighter centre.
        shape_r = 0.55 + 0.45 * np.clip(d / r, 0, 1) ** 2
        trans[y0:y1, x0:x1] *= 1.0 - m["depth"] * disc * shape_r
    return trans


def flat_fields(shape: tuple[int, int], filters: list[str], cam: Camera,
                rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    """Relative response per filter (median 1): PRNU x vignetting x dust; and its recipe."""
    ny, nx = shape
    y0, x0 = subframe_origin(shape)
    yy, xx = np.mgrid[0:ny, 0:nx]
    # Vignetting centred near (not exactly on) the optical axis, in full-sensor pixels.
    cy, cx = FULL_SHAPE[0] / 2 + 40.0, FULL_SHAPE[1] / 2 - 60.0
    r_corner = np.hypot(FULL_SHAPE[0] / 2, FULL_SHAPE[1] / 2)
    rr = np.hypot(yy + y0 - cy, xx + x0 - cx) / r_corner
    vignetting = 1.0 - cam.vignetting_at_corner * rr**2
    prnu = 1.0 + rng.normal(0, cam.prnu_rms, shape)
    large = 1.0 + _smooth_noise(shape, cam.large_scale_rms, 200.0, rng)
    area_frac = nx * ny / (FULL_SHAPE[0] * FULL_SHAPE[1])
    n_common = max(2, int(round(cam.n_dust_common_full * area_frac)))
    n_filter = max(1, int(round(cam.n_dust_filter_full * area_frac)))
    common_motes = dust_motes(shape, cam, n_common, rng)
    common = vignetting * prnu * large * dust_shadow(shape, common_motes)
    flats, recipe = {}, {"vignetting_centre_full_px": [cx, cy], "dust_common": common_motes,
                         "dust_filter": {}}
    for f in filters:
        motes = dust_motes(shape, cam, n_filter, rng)
        recipe["dust_filter"][f] = motes
        flat = common * (1.0 + rng.normal(0, cam.prnu_filter_rms, shape)) * dust_shadow(shape, motes)
        flats[f] = (flat / np.median(flat)).astype(np.float32)
    return flats, recipe


def cosmic_rays(shape: tuple[int, int], exptime_s: float, cam: Camera,
                rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Electrons deposited by cosmic rays (short tracks) during ``exptime_s`` seconds."""
    ny, nx = shape
    area_cm2 = nx * ny * (PIXEL_UM * 1e-4) ** 2
    n = rng.poisson(cam.cosmic_rate_per_cm2_s * area_cm2 * exptime_s)
    img = np.zeros(shape)
    for _ in range(n):
        length = int(rng.integers(1, 7))
        ang = rng.uniform(0, 2 * np.pi)
        x, y = rng.uniform(0, nx), rng.uniform(0, ny)
        energy = rng.uniform(*cam.cosmic_energy_e)
        t = np.linspace(0, length - 1, length)
        px = np.clip((x + t * np.cos(ang)).astype(int), 0, nx - 1)
        py = np.clip((y + t * np.sin(ang)).astype(int), 0, ny - 1)
        np.add.at(img, (py, px), energy / length * rng.uniform(0.6, 1.4, length))
    return img, n


def read_out(electrons: np.ndarray, bias: np.ndarray, cam: Camera,
             rng: np.random.Generator) -> np.ndarray:
    """Digitise: electrons / gain + bias + read noise, mild non-linearity, uint16 clip.

    Parameters
    ----------
    electrons : collected electrons per pixel (after Poisson noise).
    bias : noise-free bias map, ADU.
    cam : camera parameters.
    rng : random generator.
    """
    adu = electrons / cam.gain_e_per_adu + bias
    adu += rng.normal(0, cam.read_noise_adu, adu.shape) + rng.normal(0, cam.bias_frame_jitter_adu)
    hi = adu > cam.nonlinearity_start_adu
    adu[hi] = cam.nonlinearity_start_adu + (adu[hi] - cam.nonlinearity_start_adu) * cam.nonlinearity_slope
    return np.clip(np.rint(adu), 0, cam.saturation_adu).astype(np.uint16)
