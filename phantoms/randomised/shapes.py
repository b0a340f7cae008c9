"""Analytic shapes drawn with partial volume: each returns the fraction of a pixel it covers on one plane.

A shape is evaluated on an axial plane ``z`` over a pixel grid (``x`` columns, ``y`` rows, mm,
LPS) inside its own bounding box, and returns ``(box, fraction)`` with ``fraction`` in [0, 1]: a
linear ramp one pixel wide across the surface, i.e. the area of the pixel inside the shape for a
locally flat surface. Supersampling the grid sharpens the ramp; averaging planes along z gives
the slice profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Box = tuple[slice, slice]
Hit = tuple[Box, np.ndarray]


def _box(x: np.ndarray, y: np.ndarray, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> Box | None:
    """Index ranges of the pixel centres inside [x_lo, x_hi] x [y_lo, y_hi] (ascending x, y), or None."""
    c0, c1 = int(np.searchsorted(x, x_lo, "left")), int(np.searchsorted(x, x_hi, "right"))
    r0, r1 = int(np.searchsorted(y, y_lo, "left")), int(np.searchsorted(y, y_hi, "right"))
    if c1 <= c0 or r1 <= r0:
        return None
    return slice(r0, r1), slice(c0, c1)


def _ramp(signed_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Coverage from a signed distance (positive inside), one pixel wide."""
    return np.clip(signed_mm / pixel_mm + 0.5, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Tube:
    """A straight vessel piece: a cone frustum with rounded ends from ``start`` (radius r0) to ``end`` (r1)."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    r0: float
    r1: float

    @property
    def z_range(self) -> tuple[float, float]:
        r = max(self.r0, self.r1)
        return min(self.start[2], self.end[2]) - r, max(self.start[2], self.end[2]) + r

    def point(self, t: float) -> np.ndarray:
        a, b = np.asarray(self.start), np.asarray(self.end)
        return a + t * (b - a)

    def radius(self, t: float) -> float:
        return self.r0 + t * (self.r1 - self.r0)

    @property
    def direction(self) -> np.ndarray:
        d = np.asarray(self.end) - np.asarray(self.start)
        n = float(np.linalg.norm(d))
        return d / n if n > 0 else np.array([0.0, 0.0, 1.0])

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.asarray(self.end) - np.asarray(self.start)))

    def signed_distance(self, px: np.ndarray, py: np.ndarray, z: float) -> np.ndarray:
        """Radius at the closest axis point minus the distance to it (positive inside)."""
        a = np.asarray(self.start)
        d = np.asarray(self.end) - a
        dd = max(float(d @ d), 1e-12)
        t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (z - a[2]) * d[2]) / dd, 0.0, 1.0)
        qx, qy, qz = px - (a[0] + t * d[0]), py - (a[1] + t * d[1]), z - (a[2] + t * d[2])
        return (self.r0 + t * (self.r1 - self.r0)) - np.sqrt(qx * qx + qy * qy + qz * qz)

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        z0, z1 = self.z_range
        if not z0 - pixel_mm <= z <= z1 + pixel_mm:
            return None
        r = max(self.r0, self.r1) + pixel_mm
        # The axis points within reach of the plane bound the box.
        (ax, ay, az), (bx, by, bz) = self.start, self.end
        if abs(bz - az) > 1e-9:
            t_lo = np.clip(((z - r) - az) / (bz - az), 0.0, 1.0)
            t_hi = np.clip(((z + r) - az) / (bz - az), 0.0, 1.0)
            t0, t1 = min(t_lo, t_hi), max(t_lo, t_hi)
        else:
            t0, t1 = 0.0, 1.0
        xs = (ax + t0 * (bx - ax), ax + t1 * (bx - ax))
        ys = (ay + t0 * (by - ay), ay + t1 * (by - ay))
        box = _box(x, y, min(xs) - r, max(xs) + r, min(ys) - r, max(ys) + r)
        if box is None:
            return None
        px, py = x[box[1]][None, :], y[box[0]][:, None]
        fraction = _ramp(self.signed_distance(px, py, z), pixel_mm)
        return (box, fraction) if fraction.any() else None


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with semi-axes ``axes`` along the columns of the rotation ``frame`` (3 x 3)."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    frame: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def _matrix(self) -> np.ndarray:
        return np.asarray(self.frame, dtype=np.float64)

    @property
    def extent(self) -> np.ndarray:
        """Half-size of the axis-aligned bounding box (3,)."""
        m = self._matrix * np.asarray(self.axes)[None, :]
        return np.sqrt((m**2).sum(axis=1))

    @property
    def z_range(self) -> tuple[float, float]:
        e = float(self.extent[2])
        return self.centre[2] - e, self.centre[2] + e

    def normalised_radius(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray | float) -> np.ndarray:
        return np.sqrt(self._terms(px, py, pz)[0])

    def _terms(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(rho squared, |gradient of rho squared|) at the points."""
        m = self._matrix
        dx, dy, dz = px - self.centre[0], py - self.centre[1], pz - self.centre[2]
        shape = np.broadcast_shapes(np.shape(dx), np.shape(dy), np.shape(dz))
        rho2 = np.zeros(shape, dtype=np.float64)
        grad = [np.zeros(shape, dtype=np.float64) for _ in range(3)]
        for k in range(3):
            u = (dx * m[0, k] + dy * m[1, k] + dz * m[2, k]) / self.axes[k]
            rho2 = rho2 + u * u
            for j in range(3):
                grad[j] = grad[j] + (2.0 * u / self.axes[k]) * m[j, k]
        return rho2, np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)

    def signed_distance(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray | float) -> np.ndarray:
        """First-order distance to the surface (positive inside)."""
        rho2, grad = self._terms(px, py, pz)
        return (1.0 - rho2) / np.maximum(grad, 1e-6)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) points -> (N,) inside."""
        return self.normalised_radius(points[:, 0], points[:, 1], points[:, 2]) <= 1.0

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        z0, z1 = self.z_range
        if not z0 - pixel_mm <= z <= z1 + pixel_mm:
            return None
        e = self.extent
        box = _box(x, y, self.centre[0] - e[0] - pixel_mm, self.centre[0] + e[0] + pixel_mm,
                   self.centre[1] - e[1] - pixel_mm, self.centre[1] + e[1] + pixel_mm)
        if box is None:
            return None
        fraction = _ramp(self.signed_distance(x[box[1]][None, :], y[box[0]][:, None], z), pixel_mm)
        return (box, fraction) if fraction.any() else None


@dataclass(frozen=True)
class Column:
    """An elliptic cylinder along z from ``z0`` to ``z1``; centre and semi-axes vary linearly with z
    and the semi-axes shrink by ``taper`` (fraction) towards both ends quadratically."""

    z0: float
    z1: float
    centre0: tuple[float, float]
    centre1: tuple[float, float]
    axes0: tuple[float, float]
    axes1: tuple[float, float]
    taper: float = 0.0

    @property
    def z_range(self) -> tuple[float, float]:
        return self.z0, self.z1

    def section(self, z: float) -> tuple[float, float, float, float]:
        t = (z - self.z0) / max(self.z1 - self.z0, 1e-9)
        shrink = 1.0 - self.taper * (2.0 * t - 1.0) ** 2
        cx = self.centre0[0] + t * (self.centre1[0] - self.centre0[0])
        cy = self.centre0[1] + t * (self.centre1[1] - self.centre0[1])
        a = (self.axes0[0] + t * (self.axes1[0] - self.axes0[0])) * shrink
        b = (self.axes0[1] + t * (self.axes1[1] - self.axes0[1])) * shrink
        return cx, cy, a, b

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        if not self.z0 <= z <= self.z1:
            return None
        cx, cy, a, b = self.section(z)
        if a <= 0 or b <= 0:
            return None
        box = _box(x, y, cx - a - pixel_mm, cx + a + pixel_mm, cy - b - pixel_mm, cy + b + pixel_mm)
        if box is None:
            return None
        px, py = x[box[1]][None, :] - cx, y[box[0]][:, None] - cy
        rho2 = (px / a) ** 2 + (py / b) ** 2
        grad = 2.0 * np.sqrt((px / (a * a)) ** 2 + (py / (b * b)) ** 2)
        fraction = _ramp((1.0 - rho2) / np.maximum(grad, 1e-6), pixel_mm)
        return (box, fraction) if fraction.any() else None


@dataclass(frozen=True)
class Rib:
    """One rib of a ``RibCage``: its mean height, tilt (posterior higher), thickness along z and
    normalised radial extent ``inner``..``outer`` of the cage's wall section."""

    z_mid: float
    tilt_mm: float
    thickness: float
    inner: float
    outer: float
    #: Half-width (radians) of the anterior gap (costal cartilage) around angle -pi/2.
    gap_half_width: float = 0.5


@dataclass(frozen=True)
class RibCage:
    """All ribs: elliptic ring sectors of ``body``'s section, each tilted so its height varies with
    the angle around the body. Evaluated on the ring's pixels only."""

    body: Column
    ribs: tuple[Rib, ...]

    @property
    def z_range(self) -> tuple[float, float]:
        if not self.ribs:
            return 0.0, -1.0
        return (min(r.z_mid - abs(r.tilt_mm) - r.thickness for r in self.ribs),
                max(r.z_mid + abs(r.tilt_mm) + r.thickness for r in self.ribs))

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        near = [r for r in self.ribs if abs(z - r.z_mid) <= abs(r.tilt_mm) + r.thickness]
        if not near or not self.body.z0 <= z <= self.body.z1:
            return None
        cx, cy, a, b = self.body.section(z)
        box = _box(x, y, cx - a, cx + a, cy - b, cy + b)
        if box is None:
            return None
        px, py = x[box[1]][None, :] - cx, y[box[0]][:, None] - cy
        rho = np.sqrt((px / a) ** 2 + (py / b) ** 2)
        lo = min(r.inner for r in near) - 2 * pixel_mm / min(a, b)
        hi = max(r.outer for r in near) + 2 * pixel_mm / min(a, b)
        rows, cols = np.nonzero((rho >= lo) & (rho <= hi))
        if rows.size == 0:
            return None
        ring_rho = rho[rows, cols]
        qx, qy = px[0, cols] / a, py[rows, 0] / b
        angle = np.arctan2(qy, qx)
        scale = min(a, b)
        gap_angle = np.abs(np.angle(np.exp(1j * (angle + math.pi / 2))))
        best = np.full(rows.shape, -np.inf)
        for r in near:
            height = r.z_mid + r.tilt_mm * np.sin(angle)
            along = r.thickness / 2.0 - np.abs(z - height)
            radial = np.minimum(ring_rho - r.inner, r.outer - ring_rho) * scale
            gap = (gap_angle - r.gap_half_width) * scale
            best = np.maximum(best, np.minimum(np.minimum(radial, along), gap))
        fraction = np.zeros(rho.shape, dtype=np.float32)
        fraction[rows, cols] = _ramp(best, pixel_mm)
        return (box, fraction) if fraction.any() else None


@dataclass(frozen=True)
class Table:
    """The CT table: a curved shell below the patient, the same on every slice."""

    top_y: float
    curvature: float
    thickness: float
    half_width: float

    @property
    def z_range(self) -> tuple[float, float]:
        return -math.inf, math.inf

    def draw(self, x: np.ndarray, y: np.ndarray, z: float, pixel_mm: float) -> Hit | None:
        box = _box(x, y, -self.half_width, self.half_width, self.top_y - 1.0,
                   self.top_y + self.thickness + self.curvature * self.half_width**2 + 1.0)
        if box is None:
            return None
        px, py = x[box[1]][None, :], y[box[0]][:, None]
        surface = self.top_y + self.curvature * px * px
        signed = np.minimum(np.minimum(py - surface, surface + self.thickness - py), self.half_width - np.abs(px))
        fraction = _ramp(signed, pixel_mm)
        return (box, fraction) if fraction.any() else None
