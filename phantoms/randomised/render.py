"""Renders a randomised scene as CT slices: partial volume, slice profile, kernel, noise, streaks, motion.

Each output slice is the mean of ``z_samples`` planes across its thickness, each plane drawn on a
grid ``supersample`` times finer than the pixels and block-averaged (partial volume in all three
directions). The ideal slice is then blurred (soft/standard kernel) or edge-enhanced (sharp),
given correlated noise, streaks from dense objects, and motion ghosts near the heart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phantoms.randomised.anatomy import Scene, build_scene
from phantoms.randomised.spec import RandomisedSpec

#: HU range stored (12 bits with intercept -1024).
HU_MIN = -1024
HU_MAX = 3071
#: A slice shows a clot when some pixel is at least this much clot (partial volume).
CLOT_FRACTION_ON_SLICE = 0.5
#: Planes per millimetre of slice thickness (at least one per slice, at most 6), each with a sub-pixel soft edge.
_PLANES_PER_MM = 0.7
_TEXTURE_STEP_MM = 5.0


@dataclass(frozen=True)
class Geometry:
    """Where each voxel of the ``(n_slices, rows, columns)`` volume lies (LPS mm)."""

    rows: int
    columns: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    x_mm: np.ndarray  # (columns,) pixel centres
    y_mm: np.ndarray  # (rows,)
    z_mm: np.ndarray  # (n_slices,) ascending

    @property
    def image_positions_patient(self) -> tuple[tuple[float, float, float], ...]:
        x0, y0 = float(self.x_mm[0]), float(self.y_mm[0])
        return tuple((round(x0, 4), round(y0, 4), round(float(z), 4)) for z in self.z_mm)


def geometry_of(spec: RandomisedSpec) -> Geometry:
    """The pixel grid: the FOV centred near the body (offset drawn from the seed), the scan
    placed on the table at a position drawn from the seed."""
    rng = np.random.default_rng([spec.seed, 7])
    n = spec.rows
    ps = spec.pixel_spacing_mm
    cx, cy = float(rng.uniform(-15.0, 15.0)), float(rng.uniform(-10.0, 25.0))
    x = (cx - (n - 1) / 2.0 * ps + ps * np.arange(n)).astype(np.float64)
    y = (cy - (n - 1) / 2.0 * ps + ps * np.arange(n)).astype(np.float64)
    start = float(rng.uniform(-400.0, 100.0))
    z = start + spec.slice_spacing_mm * np.arange(spec.n_slices, dtype=np.float64)
    return Geometry(n, n, ps, spec.slice_thickness_mm, x, y, z)


class _Texture:
    """A smooth random 3-D field (std about 1) on a coarse grid, sampled on any plane (trilinear,
    as two separable interpolation matrices)."""

    def __init__(self, rng: np.random.Generator, geometry: Geometry, x: np.ndarray, y: np.ndarray) -> None:
        self.z0 = float(geometry.z_mm[0]) - geometry.slice_thickness_mm - _TEXTURE_STEP_MM
        z_extent = float(geometry.z_mm[-1] - geometry.z_mm[0]) + 2 * geometry.slice_thickness_mm + 2 * _TEXTURE_STEP_MM
        self.wx = self._weights(x)
        self.wy = self._weights(y)
        nz = int(math.ceil(z_extent / _TEXTURE_STEP_MM)) + 2
        field = ndimage.gaussian_filter(
            rng.standard_normal((nz, self.wy[2], self.wx[2])).astype(np.float32), 0.8)
        self.field = (field / max(float(field.std()), 1e-6)).astype(np.float32)

    @staticmethod
    def _weights(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Linear interpolation from a coarse grid over ``coords``: (lower index, weight of the upper, n)."""
        origin = float(coords[0]) - _TEXTURE_STEP_MM
        n = int(math.ceil((float(coords[-1]) - origin) / _TEXTURE_STEP_MM)) + 3
        u = (coords - origin) / _TEXTURE_STEP_MM
        i0 = np.clip(np.floor(u).astype(int), 0, n - 2)
        return i0, (u - i0).astype(np.float32), n

    def plane(self, z: float) -> np.ndarray:
        u = float(np.clip((z - self.z0) / _TEXTURE_STEP_MM, 0.0, self.field.shape[0] - 1.001))
        k = int(u)
        t = u - k
        coarse = (1.0 - t) * self.field[k] + t * self.field[k + 1]
        iy, ty, _ = self.wy
        ix, tx, _ = self.wx
        rows = coarse[iy] * (1.0 - ty)[:, None] + coarse[iy + 1] * ty[:, None]
        return rows[:, ix] * (1.0 - tx)[None, :] + rows[:, ix + 1] * tx[None, :]


class Renderer:
    """Draws the slices of one spec: ``slices()`` yields (HU int16 (rows, columns), clot fraction max)."""

    def __init__(self, spec: RandomisedSpec) -> None:
        self.spec = spec
        self.geometry = geometry_of(spec)
        g = self.geometry
        half = spec.slice_thickness_mm / 2.0
        self.scene: Scene = build_scene(spec, (float(g.z_mm[0]) - half, float(g.z_mm[-1]) + half))
        rng = np.random.default_rng([spec.seed, 13])
        s = spec.supersample
        ps = spec.pixel_spacing_mm
        offsets = (np.arange(s) + 0.5) / s - 0.5
        self._x = (g.x_mm[:, None] + offsets[None, :] * ps).ravel()
        self._y = (g.y_mm[:, None] + offsets[None, :] * ps).ravel()
        self._texture = _Texture(rng, g, self._x, self._y)
        self._fine_mm = ps / s
        planes = int(np.clip(math.ceil(spec.slice_thickness_mm * _PLANES_PER_MM), 1, 6))
        # Triangular-ish slice profile: planes spread over the thickness, centre weighted.
        self._plane_offsets = ((np.arange(planes) + 0.5) / planes - 0.5) * spec.slice_thickness_mm
        w = 1.0 - 0.5 * np.abs(self._plane_offsets) / max(half, 1e-6)
        self._plane_weights = w / w.sum()
        self._kernel = self._draw_kernel(rng)
        self._streak_params = rng.uniform(0.0, 1.0, (len(self.scene.streak_sources), 6, 3))
        self._streak_cache: dict[int, np.ndarray] = {}
        self._layer_z = np.array([layer.shape.z_range for layer in self.scene.layers], dtype=np.float64)
        self._noise_seed = int(rng.integers(0, 2**31 - 1))
        self._motion_rng_seed = int(rng.integers(0, 2**31 - 1))

    def _draw_kernel(self, rng: np.random.Generator) -> dict[str, float]:
        ps = self.spec.pixel_spacing_mm
        if self.spec.kernel == "soft":
            blur, corr, sharpen = rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.3), 0.0
        elif self.spec.kernel == "standard":
            blur, corr, sharpen = rng.uniform(0.35, 0.6), rng.uniform(0.5, 0.9), 0.0
        else:
            blur, corr, sharpen = rng.uniform(0.2, 0.35), rng.uniform(0.3, 0.5), rng.uniform(0.4, 1.0)
        return {"blur_px": float(blur) / ps, "noise_corr_px": float(corr) / ps, "sharpen": float(sharpen)}

    # -- the ideal slice ----------------------------------------------------------------------

    def _plane(self, z: float) -> tuple[np.ndarray, np.ndarray]:
        """One plane at the fine grid: (HU, clot fraction)."""
        x, y = self._x, self._y
        image = np.full((len(y), len(x)), -1000.0, dtype=np.float32)
        clot = np.zeros_like(image)
        texture: np.ndarray | None = None
        reach = 2.0 * self._fine_mm
        for i in np.flatnonzero((self._layer_z[:, 0] - reach <= z) & (z <= self._layer_z[:, 1] + reach)):
            layer = self.scene.layers[int(i)]
            hit = layer.shape.draw(x, y, z, self._fine_mm)
            if hit is None:
                continue
            box, fraction = hit
            value: np.ndarray | float = layer.hu
            if layer.texture_hu:
                if texture is None:
                    texture = self._texture.plane(z)
                value = layer.hu + layer.texture_hu * texture[box]
            region = image[box]
            image[box] = region + fraction * (value - region)
            if layer.role == "clot":
                clot[box] = np.maximum(clot[box], fraction)
            elif layer.role == "calcification":
                clot[box] = clot[box] * (1.0 - fraction)
        return image, clot

    def _ideal(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        z = float(self.geometry.z_mm[k])
        s = self.spec.supersample
        n = self.geometry.rows
        image = np.zeros((n * s, n * s), dtype=np.float32)
        clot = np.zeros_like(image)
        for offset, weight in zip(self._plane_offsets, self._plane_weights, strict=True):
            plane, fraction = self._plane(z + float(offset))
            image += float(weight) * plane
            clot += float(weight) * fraction
        if s > 1:
            image = image.reshape(n, s, n, s).mean(axis=(1, 3))
            clot = clot.reshape(n, s, n, s).mean(axis=(1, 3))
        return image, clot

    # -- acquisition effects --------------------------------------------------------------------

    def _streak_pattern(self, i: int) -> np.ndarray:
        """The streaks source ``i`` throws (the same on every slice it spans), HU (rows, columns)."""
        cached = self._streak_cache.get(i)
        if cached is not None:
            return cached
        g = self.geometry
        source = self.scene.streak_sources[i]
        dx = g.x_mm[None, :] - source.x
        dy = g.y_mm[:, None] - source.y
        along = np.exp(-np.hypot(dx, dy) / 180.0)
        out = np.zeros((g.rows, g.columns), dtype=np.float32)
        for angle_u, width_u, sign_u in self._streak_params[i]:
            angle = math.pi * angle_u
            width = 0.6 + 2.0 * width_u
            distance = np.abs(dx * math.sin(angle) - dy * math.cos(angle))
            amplitude = self.spec.streaks * source.strength * 120.0 * (1.0 if sign_u > 0.4 else -1.0)
            out += (amplitude * np.exp(-((distance / width) ** 2)) * along).astype(np.float32)
        self._streak_cache[i] = out
        return out

    def _streaks(self, k: int, rng: np.random.Generator) -> np.ndarray | None:
        if self.spec.streaks <= 0 or not self.scene.streak_sources:
            return None
        z = float(self.geometry.z_mm[k])
        out: np.ndarray | None = None
        for i, source in enumerate(self.scene.streak_sources):
            if source.z_range[0] <= z <= source.z_range[1]:
                pattern = self._streak_pattern(i) * float(rng.uniform(0.6, 1.2))
                out = pattern if out is None else out + pattern
        return out

    def _finish(self, k: int, image: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self._noise_seed, k])
        kernel = self._kernel
        image = ndimage.gaussian_filter(image, kernel["blur_px"])
        if kernel["sharpen"]:
            image = image + kernel["sharpen"] * (image - ndimage.gaussian_filter(image, 1.2 / self.spec.pixel_spacing_mm))
        z = float(self.geometry.z_mm[k])
        if self.spec.motion > 0:
            motion_rng = np.random.default_rng([self._motion_rng_seed, k])
            h0, h1 = self.scene.heart_z
            near_heart = h0 - 20.0 <= z <= h1 + 20.0
            if near_heart or motion_rng.random() < 0.1 * self.spec.motion:
                shift = motion_rng.uniform(-1.0, 1.0, 2) * self.spec.motion * 5.0 / self.spec.pixel_spacing_mm
                ghost = ndimage.shift(image, shift, order=1, mode="nearest")
                w = float(motion_rng.uniform(0.25, 0.5))
                image = (1.0 - w) * image + w * ghost
        streaks = self._streaks(k, rng)
        if streaks is not None:
            image = image + streaks
        if self.spec.noise_hu > 0:
            noise = ndimage.gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), kernel["noise_corr_px"])
            std = float(noise.std())
            if std > 0:
                image = image + noise * (self.spec.noise_hu / std)
        return np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)

    def render(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slice ``k``: (HU int16, noise-free HU float32, clot fraction float32), all (rows, columns)."""
        ideal, clot = self._ideal(k)
        return self._finish(k, ideal), ideal, clot

    def slices(self) -> Iterator[tuple[np.ndarray, float]]:
        """(HU int16, largest clot fraction on the slice) for every slice, inferior -> superior."""
        for k in range(self.spec.n_slices):
            image, _, clot = self.render(k)
            yield image, float(clot.max())


def slice_truth(spec: RandomisedSpec, geometry: Geometry, clot_max: list[float],
                clot_centres_z: list[float]) -> tuple[bool, ...]:
    """Per-slice PE truth: a pixel at least CLOT_FRACTION_ON_SLICE clot, or the slice nearest a clot's centre."""
    flags = [m >= CLOT_FRACTION_ON_SLICE for m in clot_max]
    if spec.pe:
        for z in clot_centres_z:
            k = int(np.argmin(np.abs(geometry.z_mm - z)))
            if abs(float(geometry.z_mm[k]) - z) <= max(spec.slice_spacing_mm, spec.slice_thickness_mm) and clot_max[k] > 0.0:
                flags[k] = True
    return tuple(flags)
