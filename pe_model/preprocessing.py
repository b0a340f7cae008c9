"""From a Volume to the stage-1 input tensor: the one preprocessing path of training and serving.

Volume (D, H, W) HU -> isotropic grid (Z, Y, X) at ``spacing_mm`` (torch bilinear in-plane, linear
along the normal at the slices' real positions) -> crop to the lung box (classical HU threshold and
connected components, no downloaded weights) plus ``crop_margin_mm`` -> each slice resized to S x S
and windowed into three uint8 channels (the order and the windowing are parameters: the project
resizes HU then maps each window linearly; the seed windows each crop slice by clipping and
min-max scaling, then resizes) -> chunks (N, 3, chunk_depth, S, S), the last one zero-padded.

The training cache, feature extraction, evaluation and the Predictor all call :func:`preprocess`
with the ``PreprocessConfig`` a checkpoint records (docs/METHOD.md, "One preprocessing path").

Every step is an axis-aligned affine map, so a point of a chunk's input maps back exactly onto the
source pixel grid (``input_to_patient``, ``heatmap_to_source``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from scipy import ndimage

from pe_model.volume import Volume

log = structlog.get_logger(__name__)

#: HU above which a voxel is body (soft tissue, bone, contrast).
BODY_HU = -500.0
#: HU below which a voxel inside the body is air (lungs, airways, bowel gas).
AIR_HU = -400.0
#: Lung localization runs on a grid this coarse (mm) for speed.
LUNG_MASK_SPACING_MM = 3.0
#: An air component smaller than this (ml) is not a lung.
MIN_LUNG_VOLUME_ML = 20.0
#: A second air component smaller than this fraction of the largest is not the other lung.
SECOND_LUNG_MIN_FRACTION = 0.1
#: Slices resampled per torch call: bounds the temporary memory.
_BATCH = 32


#: Windowing functions: "linear" maps [L - W/2, L + W/2] linearly onto 0..255 (rounded);
#: "minmax" is the seed's: clip to [L - W//2, L + W//2], then scale each slice's own min..max onto
#: 0..255 and truncate (docs/METHOD.md, "Windowing").
WINDOWINGS: tuple[str, ...] = ("linear", "minmax")
#: Names of the preprocessing presets (:func:`preprocess_preset`).
PREPROCESS_PRESETS: tuple[str, ...] = ("project", "seed")


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; stored in checkpoints so inference matches training.

    Defaults are the ``project`` preset, which is also what a checkpoint that records none of the
    newer fields was trained with (docs/METHOD.md).
    """

    spacing_mm: float = 1.0
    #: Square slice size fed to the network.
    input_size: int = 192
    chunk_depth: int = 10
    crop_margin_mm: float = 10.0
    #: (level, width) in HU: lung, PE-specific, mediastinal.
    windows: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0))
    #: One of WINDOWINGS.
    windowing: str = "linear"
    #: True: window each crop slice at the grid resolution, then resize the windowed image to
    #: S x S (the seed's order). False: resize HU to S x S, then window (the project's order).
    window_before_resize: bool = False

    def __post_init__(self) -> None:
        if not (self.spacing_mm > 0 and math.isfinite(self.spacing_mm)):
            raise ValueError(f"spacing_mm must be a positive number, not {self.spacing_mm}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be at least 8, not {self.input_size}")
        if self.chunk_depth < 1:
            raise ValueError(f"chunk_depth must be at least 1, not {self.chunk_depth}")
        if not (self.crop_margin_mm >= 0):
            raise ValueError(f"crop_margin_mm must be zero or more, not {self.crop_margin_mm}")
        if not self.windows or any(len(w) != 2 or not w[1] > 0 for w in self.windows):
            raise ValueError(f"windows must be (level, width > 0) pairs, not {self.windows}")
        if self.windowing not in WINDOWINGS:
            raise ValueError(f"windowing must be one of {WINDOWINGS}, not {self.windowing!r}")
        if not isinstance(self.window_before_resize, bool):
            raise ValueError(f"window_before_resize must be true or false, not {self.window_before_resize!r}")
        # Normalise lists (from JSON) to tuples so equal configs compare and hash equal.
        object.__setattr__(self, "windows", tuple((float(l), float(w)) for l, w in self.windows))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for checkpoints."""
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; a field a checkpoint does not record takes the project default."""
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {', '.join(sorted(unknown))}")
        values = dict(d)
        if "windows" in values:
            values["windows"] = tuple(tuple(w) for w in values["windows"])
        return cls(**values)


def preprocess_preset(name: str, **overrides: Any) -> PreprocessConfig:
    """The named preprocessing: ``project`` (linear windows on resized HU, +10 mm lung margin) or
    ``seed`` (the published recipe: each crop slice clipped and min-max scaled, then resized; the
    lung box without margin). ``overrides`` replace single fields (e.g. ``input_size``)."""
    if name == "project":
        return PreprocessConfig(**overrides)
    if name == "seed":
        values: dict[str, Any] = {"crop_margin_mm": 0.0, "windowing": "minmax", "window_before_resize": True}
        values.update(overrides)
        return PreprocessConfig(**values)
    raise ValueError(f"unknown preprocessing preset {name!r}; choose one of {PREPROCESS_PRESETS}")


@dataclass(frozen=True)
class CropBox:
    """Box in the isotropic resampled grid, voxel indices, half-open ``[z0, z1) x [y0, y1) x [x0, x1)``."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    #: What the box was built from: "lungs", "body" (no lungs found) or "grid" (no body found).
    basis: str = field(default="lungs", compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0


@dataclass(frozen=True, eq=False)
class PreprocessedSeries:
    """Network input of one series and the maps back to its source slices.

    ``chunks``: (N, 3, chunk_depth, S, S) uint8; ``num_slices`` real slices Z in the crop (the last
    chunk is zero-padded beyond them); ``slice_positions_mm`` (Z,) position along the normal of each
    slice; ``source_slice_index`` (Z,) nearest Volume slice of each.
    """

    chunks: torch.Tensor
    num_slices: int
    slice_positions_mm: np.ndarray
    source_slice_index: np.ndarray
    crop: CropBox
    resampled_shape: tuple[int, int, int]
    config: PreprocessConfig

    @property
    def num_chunks(self) -> int:
        return int(self.chunks.shape[0])

    def chunk_slice_range(self, chunk_index: int) -> tuple[int, int]:
        """[start, stop) of the chunk's real slices among the Z slices of the crop."""
        if not 0 <= chunk_index < self.num_chunks:
            raise IndexError(f"chunk {chunk_index} does not exist; the series has {self.num_chunks} chunks")
        depth = self.config.chunk_depth
        return chunk_index * depth, min((chunk_index + 1) * depth, self.num_slices)

    def chunk_source_indices(self, chunk_index: int) -> np.ndarray:
        """Volume slice indices the chunk covers (nearest source slice of each of its slices), in order."""
        start, stop = self.chunk_slice_range(chunk_index)
        return np.unique(self.source_slice_index[start:stop])

    # -- geometry: input tensor <-> resampled grid <-> source pixels --------------------------

    def _crop_scale(self) -> tuple[float, float]:
        """Crop voxels per input pixel along y and x (the S x S resize)."""
        _, h, w = self.crop.shape
        s = self.config.input_size
        return h / s, w / s

    def _grid_to_source_scale(self, volume: Volume) -> tuple[float, float]:
        """Source pixels per resampled-grid voxel along rows and columns."""
        _, rows, columns = volume.shape
        _, gy, gx = self.resampled_shape
        return rows / gy, columns / gx

    def _source_slice_of_position(self, volume: Volume, position_mm: float) -> float:
        """Fractional Volume slice index of a position along the normal (linear between slices)."""
        positions = volume.positions_mm
        if positions.shape[0] == 1:
            return 0.0
        k = int(np.clip(np.searchsorted(positions, position_mm, side="right") - 1, 0, positions.shape[0] - 2))
        return k + (position_mm - positions[k]) / (positions[k + 1] - positions[k])

    def input_to_patient(self, volume: Volume, chunk_index: int, d: float, y: float, x: float) -> np.ndarray:
        """LPS mm (3,) of point (d, y, x) of a chunk's input tensor (d along the chunk depth)."""
        start, _ = self.chunk_slice_range(chunk_index)
        sy, sx = self._crop_scale()
        ry, rx = self._grid_to_source_scale(volume)
        position = float(self.slice_positions_mm[0]) + (start + d) * self.config.spacing_mm
        grid_y = self.crop.y0 + (y + 0.5) * sy - 0.5
        grid_x = self.crop.x0 + (x + 0.5) * sx - 0.5
        row = (grid_y + 0.5) * ry - 0.5
        column = (grid_x + 0.5) * rx - 0.5
        return volume.patient_position(self._source_slice_of_position(volume, position), row, column)

    def _axis_weights(self, n_source: int, n_grid: int, lo: int, hi: int) -> np.ndarray:
        """(n_source, S) linear interpolation weights from the S input pixels onto source pixels.

        Undoes source -> grid (n_source -> n_grid), crop [lo, hi) and crop -> S resizing, all
        half-pixel-centred like torch's ``align_corners=False``; rows outside the crop are zero.
        """
        s = self.config.input_size
        src = np.arange(n_source, dtype=np.float64)
        grid = (src + 0.5) * (n_grid / n_source) - 0.5
        crop = grid - lo
        inp = (crop + 0.5) * (s / (hi - lo)) - 0.5
        inside = (crop >= -0.5) & (crop <= hi - lo - 0.5)
        inp = np.clip(inp, 0.0, s - 1.0)
        i0 = np.minimum(np.floor(inp).astype(np.int64), s - 2) if s > 1 else np.zeros(n_source, np.int64)
        t = inp - i0
        weights = np.zeros((n_source, s), dtype=np.float64)
        rows = np.nonzero(inside)[0]
        weights[rows, i0[rows]] = 1.0 - t[rows]
        if s > 1:
            weights[rows, i0[rows] + 1] += t[rows]
        return weights

    def heatmap_to_source(self, volume: Volume, chunk_index: int, cam: np.ndarray) -> dict[int, np.ndarray]:
        """Map a chunk's (chunk_depth, S, S) map in [0, 1] onto the source slices it covers.

        Returns {volume slice index: (Rows, Columns) float32}, zero outside the crop, so an overlay
        drawn on the source image sits on the same patient position as the input voxel.
        """
        cam = np.asarray(cam, dtype=np.float64)
        s = self.config.input_size
        if cam.shape != (self.config.chunk_depth, s, s):
            raise ValueError(f"cam must have shape ({self.config.chunk_depth}, {s}, {s}), not {cam.shape}")
        start, stop = self.chunk_slice_range(chunk_index)
        n_real = stop - start
        _, rows, columns = volume.shape
        _, gy, gx = self.resampled_shape
        wy = self._axis_weights(rows, gy, self.crop.y0, self.crop.y1)
        wx = self._axis_weights(columns, gx, self.crop.x0, self.crop.x1)
        out: dict[int, np.ndarray] = {}
        for k in self.chunk_source_indices(chunk_index):
            d = (float(volume.positions_mm[k]) - float(self.slice_positions_mm[start])) / self.config.spacing_mm
            d = float(np.clip(d, 0.0, n_real - 1))
            d0 = min(int(math.floor(d)), max(n_real - 2, 0))
            t = d - d0
            plane = cam[d0] if n_real == 1 or t == 0.0 else (1.0 - t) * cam[d0] + t * cam[d0 + 1]
            out[int(k)] = (wy @ plane @ wx.T).astype(np.float32)
        return out


def _resize_slices(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) -> (B, h, w) bilinear, half-pixel centres (align_corners=False), no antialias."""
    if tuple(slices.shape[1:]) == size:
        return slices.clone()
    return F.interpolate(slices.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def resample_isotropic(volume: Volume, spacing_mm: float = 1.0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Resample a Volume to an isotropic grid.

    Returns (grid (Z, Y, X) float32 HU, slice_positions_mm (Z,), source_slice_index (Z,) int64).
    In-plane: bilinear to round(size * pixel_spacing / spacing_mm). Along the normal: linear
    interpolation between the two source slices around each target position, using the slices'
    real positions, so uneven spacing and gaps are exact.
    """
    d, h, w = volume.shape
    row_spacing, column_spacing = volume.pixel_spacing_mm
    gy = max(1, round(h * row_spacing / spacing_mm))
    gx = max(1, round(w * column_spacing / spacing_mm))
    # int16 or float32 HU (pe_model.volume); slices are converted to float32 as they are resized, so a
    # float32 copy of the whole series is never made.
    source = torch.from_numpy(np.ascontiguousarray(volume.voxels))
    positions = volume.positions_mm
    z_count = int(math.floor((positions[-1] - positions[0]) / spacing_mm + 1e-6)) + 1
    targets = positions[0] + np.arange(z_count, dtype=np.float64) * spacing_mm
    if d == 1:
        return _resize_slices(source[:1].to(torch.float32), (gy, gx)), targets[:1], np.zeros(1, dtype=np.int64)
    lower = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, d - 2)
    t = (targets - positions[lower]) / (positions[lower + 1] - positions[lower])
    t = np.clip(t, 0.0, 1.0)
    nearest = np.where(t < 0.5, lower, lower + 1).astype(np.int64)
    grid = torch.empty((z_count, gy, gx), dtype=torch.float32)
    weight = torch.from_numpy(t.astype(np.float32)).view(-1, 1, 1)
    # Each source slice is resized in-plane once, when a target first needs it, and dropped once no
    # later target can (``lower`` never decreases): a whole in-plane-resized copy of the series is
    # never held (for 600 x 512 x 512 at 0.7 mm that copy was 300 MB of the worker's peak).
    resized: dict[int, torch.Tensor] = {}
    for b in range(0, z_count, _BATCH):
        sl = slice(b, b + _BATCH)
        below, above = lower[sl], lower[sl] + 1
        missing = [int(k) for k in np.union1d(below, above) if int(k) not in resized]
        if missing:
            fresh = _resize_slices(source[missing].to(torch.float32), (gy, gx))
            resized.update(zip(missing, fresh.unbind(0), strict=True))
        lo = torch.stack([resized[int(k)] for k in below])
        hi = torch.stack([resized[int(k)] for k in above])
        grid[sl] = torch.lerp(lo, hi, weight[sl])
        still_needed = int(lower[min(b + _BATCH, z_count - 1)])
        for k in [k for k in resized if k < still_needed]:
            del resized[k]
    return grid, targets, nearest


def _largest_components(mask: np.ndarray, count: int) -> tuple[np.ndarray, list[int]]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return labels, []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:count]
    return labels, [int(i) + 1 for i in order]


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
    if not mask.any():
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(mask.any(axis=other))[0]
        bounds.extend([int(present[0]), int(present[-1]) + 1])
    return tuple(bounds)  # type: ignore[return-value]


def lung_crop_box(grid: torch.Tensor, spacing_mm: float, margin_mm: float) -> CropBox:
    """Bounding box of both lungs in ``grid`` (Z, Y, X) HU, plus ``margin_mm``, clipped to the grid.

    Body = largest component above BODY_HU with each slice's holes filled; lungs = the one or two
    largest air components inside it (air outside the body never counts). Computed on a grid of
    about LUNG_MASK_SPACING_MM. Without lungs (a head CT, a phantom without air) the body box is
    returned, and without a body the whole grid; ``CropBox.basis`` says which.
    """
    shape = tuple(int(s) for s in grid.shape)
    factor = max(1, int(round(LUNG_MASK_SPACING_MM / spacing_mm)))
    with torch.no_grad():
        if factor > 1 and min(shape) >= factor:
            coarse = F.avg_pool3d(grid[None, None], kernel_size=factor, stride=factor)[0, 0].numpy()
        else:
            factor = 1
            coarse = grid.numpy()
    coarse_spacing = spacing_mm * factor
    voxel_ml = coarse_spacing**3 / 1000.0

    basis = "grid"
    box = None
    labels, biggest = _largest_components(coarse > BODY_HU, 1)
    if biggest:
        body = labels == biggest[0]
        filled = np.empty_like(body)
        for z in range(body.shape[0]):
            filled[z] = ndimage.binary_fill_holes(body[z])
        # Air enclosed by the body in its slice: the holes, never the partial-volume skin edge.
        air = filled & ~body & (coarse < AIR_HU)
        body = filled
        labels, largest = _largest_components(air, 2)
        sizes = [int((labels == i).sum()) for i in largest]
        lungs = [
            i
            for i, size in zip(largest, sizes, strict=True)
            if size * voxel_ml >= MIN_LUNG_VOLUME_ML and size >= SECOND_LUNG_MIN_FRACTION * sizes[0]
        ]
        if lungs:
            box = _box_of(np.isin(labels, lungs))
            basis = "lungs"
        else:
            box = _box_of(body)
            basis = "body"
    if box is None:
        return CropBox(0, shape[0], 0, shape[1], 0, shape[2], basis="grid")

    margin = int(math.ceil(margin_mm / spacing_mm))
    bounds: list[int] = []
    for axis in range(3):
        lo, hi = box[2 * axis] * factor, box[2 * axis + 1] * factor
        if box[2 * axis + 1] == coarse.shape[axis]:
            hi = shape[axis]  # the pooled grid drops a remainder of < factor voxels at the end
        bounds.extend([max(0, lo - margin), min(shape[axis], hi + margin)])
    z0, z1, y0, y1, x0, x1 = bounds
    crop = CropBox(z0, z1, y0, y1, x0, x1, basis=basis)
    if basis != "lungs":
        log.info("preprocess.no_lungs_found", crop_basis=basis)
    return crop


def apply_windows(grid: torch.Tensor, windows: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """(Z, Y, X) HU -> (len(windows), Z, Y, X) uint8: clip((HU - (L - W/2)) / W, 0, 1) * 255."""
    out = torch.empty((len(windows), *grid.shape), dtype=torch.uint8)
    for c, (level, width) in enumerate(windows):
        for b in range(0, grid.shape[0], _BATCH):
            scaled = (grid[b : b + _BATCH] - (level - width / 2.0)) * (255.0 / width)
            out[c, b : b + _BATCH] = scaled.clamp_(0.0, 255.0).round_().to(torch.uint8)
    return out


def apply_minmax_windows(grid: torch.Tensor, windows: tuple[tuple[float, float], ...]) -> torch.Tensor:
    """(Z, Y, X) HU -> (len(windows), Z, Y, X) uint8, the seed's windowing of each slice.

    Clip to ``[L - W // 2, L + W // 2]``, subtract the slice's minimum, divide by its new
    maximum, times 255, truncated (float64, the seed's numpy arithmetic). A slice that is constant
    after clipping (the seed divides by zero there) becomes 0.
    """
    out = torch.empty((len(windows), *grid.shape), dtype=torch.uint8)
    step = max(1, _BATCH // 4)  # float64 temporaries: a quarter of the usual batch
    for c, (level, width) in enumerate(windows):
        half = math.floor(width / 2.0)
        lower, upper = level - half, level + half
        for b in range(0, grid.shape[0], step):
            x = grid[b : b + step].to(torch.float64, copy=True).clamp_(lower, upper)
            x = x - x.amin(dim=(1, 2), keepdim=True)
            top = x.amax(dim=(1, 2), keepdim=True)
            x.div_(torch.where(top > 0, top, torch.ones_like(top))).mul_(255.0)
            x.masked_fill_(~(top > 0).expand_as(x), 0.0)
            out[c, b : b + step] = x.floor_().clamp_(0.0, 255.0).to(torch.uint8)
    return out


def window_slices(slices: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """(Z, H, W) HU -> (channels, Z, H, W) uint8 with the configured windowing."""
    if config.windowing == "minmax":
        return apply_minmax_windows(slices, config.windows)
    return apply_windows(slices, config.windows)


def _render_slices(cropped: torch.Tensor, config: PreprocessConfig, size: int) -> torch.Tensor:
    """Crop (Z, h, w) HU -> (channels, Z, size, size) uint8, in the configured order."""
    z_count = cropped.shape[0]
    channels = len(config.windows)
    if not config.window_before_resize:
        resized = torch.empty((z_count, size, size), dtype=torch.float32)
        for b in range(0, z_count, _BATCH):
            resized[b : b + _BATCH] = _resize_slices(cropped[b : b + _BATCH], (size, size))
        return window_slices(resized, config)
    out = torch.empty((channels, z_count, size, size), dtype=torch.uint8)
    for b in range(0, z_count, _BATCH):
        windowed = window_slices(cropped[b : b + _BATCH], config)  # (C, B, h, w) uint8
        flat = windowed.reshape(-1, *windowed.shape[2:]).to(torch.float32)
        scaled = _resize_slices(flat, (size, size)).round_().clamp_(0.0, 255.0)
        out[:, b : b + _BATCH] = scaled.to(torch.uint8).view(channels, -1, size, size)
    return out


def _to_chunks(windowed: torch.Tensor, depth: int) -> torch.Tensor:
    """(C, Z, S, S) uint8 -> (N, C, depth, S, S), the last chunk zero-padded."""
    channels, z_count, s, _ = windowed.shape
    n_chunks = max(1, math.ceil(z_count / depth))
    chunks = torch.zeros((n_chunks * depth, channels, s, s), dtype=torch.uint8)
    chunks[:z_count] = windowed.permute(1, 0, 2, 3)
    return chunks.view(n_chunks, depth, channels, s, s).permute(0, 2, 1, 3, 4).contiguous()


def preprocess(volume: Volume, config: PreprocessConfig = PreprocessConfig()) -> PreprocessedSeries:
    """Volume -> network input chunks (N, 3, chunk_depth, S, S) uint8 with the maps back to the source."""
    series, _ = preprocess_with_sizes(volume, config, ())
    return series


def preprocess_with_sizes(
    volume: Volume, config: PreprocessConfig, extra_sizes: tuple[int, ...]
) -> tuple[PreprocessedSeries, dict[int, torch.Tensor]]:
    """:func:`preprocess`, plus the same chunks rendered at other slice sizes from the same crop.

    The training cache stores the input-size chunks (what evaluation and the Predictor read) and
    larger ones for the training crops (224 in the seed); resampling and the lung box run once.
    """
    with torch.no_grad():
        grid, positions, source_index = resample_isotropic(volume, config.spacing_mm)
        resampled_shape = (int(grid.shape[0]), int(grid.shape[1]), int(grid.shape[2]))
        crop = lung_crop_box(grid, config.spacing_mm, config.crop_margin_mm)
        cropped = grid[crop.z0 : crop.z1, crop.y0 : crop.y1, crop.x0 : crop.x1]
        z_count = int(cropped.shape[0])
        chunks = _to_chunks(_render_slices(cropped, config, config.input_size), config.chunk_depth)
        extra = {
            size: _to_chunks(_render_slices(cropped, config, size), config.chunk_depth)
            for size in dict.fromkeys(extra_sizes)
        }
        del grid, cropped
    series = PreprocessedSeries(
        chunks=chunks,
        num_slices=z_count,
        slice_positions_mm=positions[crop.z0 : crop.z1].copy(),
        source_slice_index=source_index[crop.z0 : crop.z1].copy(),
        crop=crop,
        resampled_shape=resampled_shape,
        config=config,
    )
    return series, extra
