"""Samples the held-out chest onto axial slices, as a CT scanner would reconstruct them.

Per slice: the continuous shapes of ``phantoms.heldout.anatomy`` are evaluated on sub-planes
spread across the slice thickness and (for matrices up to 256) on a 2 x 2 supersampled in-plane
grid, then averaged: partial volume. The result is blurred by the kernel's point-spread function
(Gaussian) and given noise that is spatially correlated (white noise through a Gaussian filter),
scaled with slice thickness and patient size. Tubes are tested against the centreline segments that
cross the plane only, inside their bounding box, so a 512 x 512 slice needs no per-voxel loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phantoms.heldout.anatomy import Chest, Ellipsoid, Lung, PlacedClot, Tube
from phantoms.heldout.spec import KERNEL_SIGMA_MM

#: Paint order of the tube roles (later wins) and the HU key of each.
_ROLE_ORDER: tuple[str, ...] = ("airway", "vein", "systemic", "svc", "pa")
#: A slice shows PE when some pixel is at least this fraction clot.
CLOT_PIXEL_FRACTION = 0.3


@dataclass(frozen=True)
class SliceGrid:
    """Pixel-centre coordinates of the image: ``xs (columns,)`` and ``ys (rows,)`` in mm."""

    xs: np.ndarray
    ys: np.ndarray
    pixel_mm: float
    thickness_mm: float

    @classmethod
    def centred(cls, rows: int, columns: int, pixel_mm: float, thickness_mm: float) -> SliceGrid:
        xs = (np.arange(columns) - (columns - 1) / 2.0) * pixel_mm
        ys = (np.arange(rows) - (rows - 1) / 2.0) * pixel_mm
        return cls(xs=xs, ys=ys, pixel_mm=pixel_mm, thickness_mm=thickness_mm)


@dataclass(frozen=True)
class _TubeHit:
    """Where a plane cuts a tube, inside its bounding box [r0:r1, c0:c1] of the supersampled plane."""

    box: tuple[int, int, int, int]
    inside: np.ndarray
    s: np.ndarray
    rho: np.ndarray  # (h, w, 3) from the centreline to the point
    radius: np.ndarray
    points: np.ndarray  # (h, w, 3)


class SliceRenderer:
    """Renders slices of one chest on one grid: ``render(z) -> (HU (rows, columns), clot fraction)``."""

    def __init__(self, chest: Chest, grid: SliceGrid, rng: np.random.Generator) -> None:
        self.chest = chest
        self.grid = grid
        self.rng = rng
        columns, rows = grid.xs.size, grid.ys.size
        self.ss = 2 if max(rows, columns) <= 256 else 1
        offsets = ((np.arange(self.ss) + 0.5) / self.ss - 0.5) * grid.pixel_mm
        self.sx = (grid.xs[:, None] + offsets[None, :]).reshape(-1)
        self.sy = (grid.ys[:, None] + offsets[None, :]).reshape(-1)
        self.n_sub = int(min(4, max(1, round(grid.thickness_mm / 0.75))))
        self.sub_offsets = ((np.arange(self.n_sub) + 0.5) / self.n_sub - 0.5) * grid.thickness_mm
        self.X, self.Y = np.meshgrid(self.sx, self.sy)
        self._pieces = {t.name: _pieces(t) for t in chest.tubes}
        self._z_extent = {
            t.name: (float(t.points[:, 2].min() - t.radii.max()), float(t.points[:, 2].max() + t.radii.max()))
            for t in chest.tubes
        }
        # What does not change along z: the body's outline, depth below the skin, and the table.
        cx, cy = chest.body_centre_xy
        a, b = chest.body_semi_xy
        p = chest.body_exponent
        X, Y = self.X, self.Y
        rb = (np.abs((X - cx) / a) ** p + np.abs((Y - cy) / b) ** p) ** (1.0 / p)
        dist = np.hypot(X - cx, Y - cy)
        self.depth = np.where(rb > 1e-6, (1.0 / np.maximum(rb, 1e-6) - 1.0) * dist, np.inf)
        self.body = rb <= 1.0
        ty = chest.table_y + 0.0009 * X**2
        self.table = (Y >= ty) & (Y <= ty + 7.0) & (np.abs(X) < 230.0)
        self.rib_shell = self.body & (self.depth > chest.fat_mm + 4.0) & (self.depth < chest.fat_mm + 11.0)
        self.rib_shell &= ~((np.abs(X - cx) < 30.0) & (Y < cy))
        self.rib_phase_y = 0.8 * (Y - cy)
        self.lung_room = self.depth > chest.fat_mm + 13.0
        self.lung_q = {lung.side: _lung_radius(lung, X, Y) for lung in chest.lungs}
        self.spine_masks = _spine_masks(chest, X, Y)
        spec = chest.spec
        self.blur_px = KERNEL_SIGMA_MM[spec.kernel] / grid.pixel_mm
        self.noise_corr_px = max(0.5, 0.7 / grid.pixel_mm)
        size_factor = (spec.body_width_mm / 330.0) ** 1.5
        thick_factor = float(np.clip(math.sqrt(1.0 / grid.thickness_mm), 0.45, 1.6))
        self.noise_sd = spec.noise_hu * size_factor * thick_factor

    def render(self, z: float) -> tuple[np.ndarray, float]:
        """HU float32 (rows, columns) of the slice centred at ``z`` and its largest pixel clot fraction."""
        hu_sum = np.zeros_like(self.X)
        clot_sum = np.zeros_like(self.X)
        for dz in self.sub_offsets:
            hu, clot = self._plane(z + float(dz))
            hu_sum += hu
            clot_sum += clot
        hu_px = _block_mean(hu_sum / self.n_sub, self.ss)
        clot_px = _block_mean(clot_sum / self.n_sub, self.ss)
        if self.blur_px > 0.2:
            hu_px = ndimage.gaussian_filter(hu_px, self.blur_px, mode="nearest")
        if self.noise_sd > 0:
            white = self.rng.standard_normal(hu_px.shape)
            coloured = ndimage.gaussian_filter(white, self.noise_corr_px, mode="wrap")
            coloured /= max(float(coloured.std()), 1e-9)
            hu_px = hu_px + self.noise_sd * coloured
        return hu_px.astype(np.float32), float(clot_px.max()) if clot_px.size else 0.0

    # -- one plane ---------------------------------------------------------------------------

    def _plane(self, z: float) -> tuple[np.ndarray, np.ndarray]:
        chest = self.chest
        hu_map = chest.hu
        X, Y = self.X, self.Y
        hu = np.full(X.shape, hu_map["air"])
        clot = np.zeros(X.shape)

        # Table under the patient (curved carbon-fibre shell).
        hu[self.table] = hu_map["table"]
        body, depth = self.body, self.depth
        hu[body] = hu_map["fat"]
        hu[body & (depth > chest.fat_mm)] = hu_map["muscle"]

        self._ellipsoid(hu, chest.liver, z, hu_map["liver"], body & (depth > chest.fat_mm + 10.0))

        # Ribs: a thin shell inside the muscle, in slanted bands along z, open at the front.
        lung_lo = chest.lung_base_z - 25.0
        lung_hi = chest.lung_apex_z + 10.0
        if lung_lo <= z <= lung_hi:
            period = 25.0 * chest.z_scale
            phase = ((z - chest.carina_z) + self.rib_phase_y) / period
            band = (phase - np.floor(phase)) < 0.28
            hu[self.rib_shell & band] = hu_map["bone"]

        lungs = np.zeros(X.shape, dtype=bool)
        for lung in chest.lungs:
            lungs |= _lung_mask(lung, self.lung_q[lung.side], z)
        lungs &= self.lung_room
        hu[lungs] = hu_map["lung"]

        self._ellipsoid(hu, chest.sternum, z, hu_map["bone"])
        self._spine(hu, z)

        # Heart: myocardium, then the chambers.
        self._ellipsoid(hu, chest.heart, z, hu_map["myocardium"])
        chamber_hu = {"left_ventricle": "systemic", "left_atrium": "systemic", "right_ventricle": "rv", "right_atrium": "ra"}
        for name, ellipsoid in chest.chambers.items():
            self._ellipsoid(hu, ellipsoid, z, hu_map[chamber_hu[name]])

        hits: dict[str, _TubeHit] = {}
        clot_tubes = {name for c in chest.clots for name in c.tube_names}
        for role in _ROLE_ORDER:
            for tube in chest.tubes:
                z_lo, z_hi = self._z_extent[tube.name]
                if tube.role != role or not z_lo <= z <= z_hi:
                    continue
                hit = self._tube(tube, z, keep=tube.name in clot_tubes)
                if hit is None:
                    continue
                r0, r1, c0, c1 = hit.box
                region = hu[r0:r1, c0:c1]
                region[hit.inside] = hu_map[role]
                if tube.name in clot_tubes:
                    hits[tube.name] = hit
        for placed in chest.clots:
            for name in placed.tube_names:
                hit = hits.get(name)
                if hit is None:
                    continue
                mask = _clot_mask(placed, hit) & hit.inside
                r0, r1, c0, c1 = hit.box
                hu[r0:r1, c0:c1][mask] = placed.spec.hu
                clot[r0:r1, c0:c1][mask] = 1.0
                for centre, radius in placed.flecks:
                    fleck = np.linalg.norm(hit.points - centre, axis=-1) <= radius
                    hu[r0:r1, c0:c1][fleck & hit.inside] = hu_map["bone"] + 200.0
                    clot[r0:r1, c0:c1][fleck & hit.inside] = 1.0
        return hu, clot

    def _ellipsoid(self, hu: np.ndarray, e: Ellipsoid, z: float, value: float, within: np.ndarray | None = None) -> None:
        dz = (z - e.centre[2]) / e.semi_axes[2]
        if abs(dz) >= 1.0:
            return
        scale = math.sqrt(1.0 - dz * dz)
        inside = ((self.X - e.centre[0]) / (e.semi_axes[0] * scale)) ** 2 + (
            (self.Y - e.centre[1]) / (e.semi_axes[1] * scale)
        ) ** 2 <= 1.0
        if within is not None:
            inside &= within
        hu[inside] = value

    def _spine(self, hu: np.ndarray, z: float) -> None:
        chest = self.chest
        hu_map = chest.hu
        body, marrow, arch, canal = self.spine_masks
        hu[arch] = hu_map["bone"]
        level = (z - chest.carina_z) / (27.0 * chest.z_scale)
        if (level - math.floor(level)) < 0.2:
            hu[body] = hu_map["disc"]
        else:
            hu[body] = hu_map["bone"]
            hu[marrow] = hu_map["marrow"]
        hu[canal] = hu_map["canal"]

    def _tube(self, tube: Tube, z: float, *, keep: bool) -> _TubeHit | None:
        a, b, ra, rb, s_a, zmin, zmax = self._pieces[tube.name]
        rmax = np.maximum(ra, rb)
        sel = (zmin - rmax <= z) & (zmax + rmax >= z)
        if not sel.any():
            return None
        a, b, ra, rb, s_a = a[sel], b[sel], ra[sel], rb[sel], s_a[sel]
        reach = np.maximum(ra, rb)
        x_lo = float(np.minimum(a[:, 0], b[:, 0]).min() - reach.max())
        x_hi = float(np.maximum(a[:, 0], b[:, 0]).max() + reach.max())
        y_lo = float(np.minimum(a[:, 1], b[:, 1]).min() - reach.max())
        y_hi = float(np.maximum(a[:, 1], b[:, 1]).max() + reach.max())
        c0, c1 = int(np.searchsorted(self.sx, x_lo)), int(np.searchsorted(self.sx, x_hi, side="right"))
        r0, r1 = int(np.searchsorted(self.sy, y_lo)), int(np.searchsorted(self.sy, y_hi, side="right"))
        if c1 <= c0 or r1 <= r0:
            return None
        gx = self.sx[c0:c1][None, None, :]
        gy = self.sy[r0:r1][None, :, None]
        ab = b - a  # (K, 3)
        length2 = np.maximum((ab**2).sum(axis=1), 1e-12)
        ax, ay, az = (a[:, i][:, None, None] for i in range(3))
        bx, by, bz = (ab[:, i][:, None, None] for i in range(3))
        rx, ry, rz = gx - ax, gy - ay, z - az  # (K, h, w), (K, h, w), (K, 1, 1)
        t = np.clip((rx * bx + ry * by + rz * bz) / length2[:, None, None], 0.0, 1.0)
        px, py, pz = rx - t * bx, ry - t * by, rz - t * bz
        d = np.sqrt(px * px + py * py + pz * pz)
        radius = ra[:, None, None] + t * (rb - ra)[:, None, None]
        margin = d - radius
        k = np.argmin(margin, axis=0)
        best = np.take_along_axis(margin, k[None], axis=0)[0]
        inside = best <= 0.0
        if not inside.any():
            return None
        if not keep:
            return _TubeHit((r0, r1, c0, c1), inside, np.empty(0), np.empty(0), np.empty(0), np.empty(0))

        def pick(values: np.ndarray) -> np.ndarray:
            return np.take_along_axis(np.broadcast_to(values, margin.shape), k[None], axis=0)[0]

        t_k = pick(t)
        s = s_a[k] + t_k * np.sqrt(length2)[k]
        rho_k = np.stack([pick(px), pick(py), pick(pz)], axis=-1)
        r_k = pick(radius)
        h, w = inside.shape
        pts = np.stack(
            [np.broadcast_to(self.sx[c0:c1][None, :], (h, w)), np.broadcast_to(self.sy[r0:r1][:, None], (h, w)),
             np.full((h, w), z)], axis=-1)
        return _TubeHit((r0, r1, c0, c1), inside, s, rho_k, r_k, pts)


def _pieces(tube: Tube) -> tuple[np.ndarray, ...]:
    a = tube.points[:-1]
    b = tube.points[1:]
    return (a, b, tube.radii[:-1], tube.radii[1:], tube.arc[:-1],
            np.minimum(a[:, 2], b[:, 2]), np.maximum(a[:, 2], b[:, 2]))


def _spine_masks(chest: Chest, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Vertebral body, its marrow, the posterior arch and the spinal canal (the same on every slice)."""
    s = chest.spine_scale
    x0, y0 = chest.spine_centre_xy
    body = ((X - x0) / (19.0 * s)) ** 2 + ((Y - y0) / (16.0 * s)) ** 2
    arch = ((X - x0) / (25.0 * s)) ** 2 + ((Y - y0 - 31.0 * s) / (11.0 * s)) ** 2 <= 1.0
    canal = np.hypot(X - x0, Y - y0 - 25.0 * s) <= 8.0 * s
    return body <= 1.0, body <= 0.72, arch, canal


def _lung_radius(lung: Lung, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Superellipse radius of each point at the lung's full width (1 on its outline)."""
    cx, cy = lung.centre_xy
    sa, sb = lung.semi_xy
    e = lung.exponent
    return np.asarray((np.abs((X - cx) / sa) ** e + np.abs((Y - cy) / sb) ** e) ** (1.0 / e))


def _lung_mask(lung: Lung, q_full: np.ndarray, z: float) -> np.ndarray:
    """The lung's cross-section at ``z``: narrowing above the shoulder to the apex, domed at the base."""
    if z > lung.apex_z or z < lung.base_z:
        return np.zeros(q_full.shape, dtype=bool)
    taper = 1.0
    if z > lung.shoulder_z:
        u = (z - lung.shoulder_z) / (lung.apex_z - lung.shoulder_z)
        taper = math.sqrt(max(0.0, 1.0 - u * u))
    if taper <= 0.02:
        return np.zeros(q_full.shape, dtype=bool)
    q = q_full / taper
    floor = lung.base_z + lung.dome_mm * np.clip(1.0 - q * q, 0.0, 1.0)
    return (q <= 1.0) & (z >= floor)


def _clot_mask(placed: PlacedClot, hit: _TubeHit) -> np.ndarray:
    """Which lumen points of ``hit`` the clot fills (its form decides the shape)."""
    spec = placed.spec
    d = np.linalg.norm(hit.rho, axis=-1)
    r = np.maximum(hit.radius, 1e-6)
    if placed.spheres:
        mask = np.zeros(d.shape, dtype=bool)
        for centre, radius in placed.spheres:
            mask |= np.linalg.norm(hit.points - centre, axis=-1) <= radius
        return mask & (d <= 0.88 * r)
    centre_s = 0.5 * (placed.s0 + placed.s1)
    half = max(0.5 * (placed.s1 - placed.s0), 1e-6)
    u = (hit.s - centre_s) / half
    if spec.form == "occlusive":
        return np.abs(u) <= 1.0 - 0.3 * (d / r) ** 2
    if spec.form == "central":
        return u**2 + (d / (0.62 * r)) ** 2 <= 1.0
    if spec.form == "eccentric":
        off = hit.rho - 0.4 * r[..., None] * placed.wall
        return u**2 + (np.linalg.norm(off, axis=-1) / (0.68 * r)) ** 2 <= 1.0
    # mural: a crescent on one wall, thinning to its ends.
    toward = (hit.rho @ placed.wall) / np.maximum(d, 1e-6)
    return (np.abs(u) <= 1.0) & (d >= r * (0.5 + 0.45 * u**2)) & (toward >= math.cos(math.radians(100.0)))


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
