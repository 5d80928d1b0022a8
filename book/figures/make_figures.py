"""Make the static figures of the prose chapters (run: python book/figures/make_figures.py).

The figures are sketches with illustrative values, not measurements of the sample night.
Instrument facts (gain, read noise, pixel scale, aperture) come from ``config.py``.
Rerunning overwrites the PNG files next to this script.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import j1  # noqa: E402

import config  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent
DPI = 110
COLORS = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, 4))


def snr(source_e: np.ndarray, n_pix: float, sky_e_per_pix: float, dark_e_per_pix: float,
        read_noise_e: float) -> np.ndarray:
    """Signal-to-noise of an aperture measurement (CCD equation without sky-error term)."""
    noise = np.sqrt(source_e + n_pix * (sky_e_per_pix + dark_e_per_pix + read_noise_e**2))
    return source_e / noise


def figure_signal_to_noise(path: Path) -> None:
    """S/N versus collected source electrons for a faint and a bright sky."""
    source_e = np.logspace(1, 7, 300)
    radius_px = 6.0
    n_pix = np.pi * radius_px**2
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(source_e, np.sqrt(source_e), color="0.5", ls=":", lw=2,
            label=r"photon noise of the star only ($\sqrt{N_*}$)")
    cases = [
        ("read noise only (no sky, no dark)", 0.0, COLORS[0]),
        ("dark sky: 200 e$^-$ per pixel", 200.0, COLORS[1]),
        ("bright (moonlit) sky: 5000 e$^-$ per pixel", 5000.0, COLORS[2]),
    ]
    for label, sky, color in cases:
        ax.plot(source_e, snr(source_e, n_pix, sky, 0.0, config.read_noise_e), color=color,
                lw=2, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"Electrons collected from the star, $N_*$ [e$^-$]")
    ax.set_ylabel("Signal-to-noise ratio")
    ax.set_title(f"Aperture of radius {radius_px:.0f} px, read noise "
                 f"{config.read_noise_e:.1f} e$^-$ (illustrative sky levels)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def moffat(r: np.ndarray, fwhm: float, beta: float) -> np.ndarray:
    """Moffat profile normalised to 1 at the centre; r and fwhm in the same unit."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (1.0 + (r / alpha) ** 2) ** (-beta)


def gaussian(r: np.ndarray, fwhm: float) -> np.ndarray:
    """Gaussian profile normalised to 1 at the centre; r and fwhm in the same unit."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    return np.exp(-0.5 * (r / sigma) ** 2)


def airy(r_arcsec: np.ndarray, wavelength_m: float, aperture_m: float) -> np.ndarray:
    """Airy pattern of an unobstructed circular aperture, normalised to 1 at the centre."""
    x = np.pi * aperture_m * np.radians(r_arcsec / 3600.0) / wavelength_m
    x = np.where(x == 0, 1e-12, x)
    return (2.0 * j1(x) / x) ** 2


def figure_psf_profiles(path: Path) -> None:
    """Radial profiles: diffraction limit of the telescope against a seeing-limited star."""
    r = np.linspace(0.0, 8.0, 800)
    seeing_fwhm = 3.0
    aperture_m = config.aperture_mm / 1000.0
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    curves = [
        (f"Airy pattern, D = {config.aperture_mm:.0f} mm, 550 nm",
         airy(r, 550e-9, aperture_m), COLORS[0], "-"),
        (f"Gaussian, FWHM {seeing_fwhm:.0f}\"", gaussian(r, seeing_fwhm), COLORS[1], "--"),
        (f"Moffat, beta = 2.5, FWHM {seeing_fwhm:.0f}\"", moffat(r, seeing_fwhm, 2.5),
         COLORS[2], "-"),
    ]
    for ax, log in zip(axes, (False, True), strict=True):
        for label, profile, color, ls in curves:
            ax.plot(r, profile, color=color, ls=ls, lw=2, label=label)
        ax.set_xlabel("Distance from the star's centre [arcsec]")
        ax.set_ylabel("Intensity / central intensity")
        ax.axvline(config.pixel_scale_arcsec, color="0.6", lw=1, ls=":")
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.5)
            ax.set_title("Logarithmic: the wings", fontsize=10)
        else:
            ax.set_title("Linear: the core (dotted line: one pixel)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def figure_raw_pixel(path: Path) -> None:
    """One row of a sketched raw light frame, built up from its ingredients."""
    rng = np.random.default_rng(config.sample_seed)
    x = np.arange(400)
    offset = 500.0 + 3.0 * np.sin(x / 9.0)  # bias level with a small column pattern
    dark = np.full(x.shape, 8.0)
    dark[[73, 251]] += [300.0, 180.0]  # two hot pixels
    flat = 1.0 - 0.25 * ((x - 200.0) / 200.0) ** 2  # vignetting towards the edges
    flat *= 1.0 + 0.01 * rng.standard_normal(x.size)  # pixel-to-pixel response
    flat[300:318] *= 0.85  # shadow of a dust grain
    sky = np.full(x.shape, 600.0)
    star = 800.0 * moffat(np.abs(x - 140.0), 5.0, 2.5)
    gain = config.gain_e_per_adu
    light_e = (sky + star) * flat * gain  # electrons collected (illustrative)
    noisy = (rng.poisson(light_e) / gain + dark
             + rng.normal(0.0, config.read_noise_e / gain, x.size) + offset)
    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    ax.plot(x, noisy, color="0.7", lw=1, label="raw pixel values (with noise)")
    ax.plot(x, offset, color=COLORS[0], lw=2, label="bias level (offset)")
    ax.plot(x, offset + dark, color=COLORS[1], lw=1.5, label="+ dark current and hot pixels")
    ax.plot(x, offset + dark + sky * flat, color=COLORS[2], lw=2,
            label="+ sky × flat field (vignetting, dust)")
    ax.plot(x, offset + dark + (sky + star) * flat, color=COLORS[3], lw=1.2, ls="--",
            label="+ star × flat field")
    ax.set_xlabel("Column along one image row [pixel]")
    ax.set_ylabel("Pixel value [ADU]")
    ax.set_title("What a raw light-frame pixel is made of (sketch, illustrative values)",
                 fontsize=10)
    ax.set_ylim(0, 2100)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main() -> None:
    """Write every figure of the prose chapters next to this script."""
    figure_signal_to_noise(OUT_DIR / "signal_to_noise.png")
    figure_psf_profiles(OUT_DIR / "psf_profiles.png")
    figure_raw_pixel(OUT_DIR / "raw_pixel.png")
    for png in sorted(OUT_DIR.glob("*.png")):
        print(f"{png.name}: {png.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
