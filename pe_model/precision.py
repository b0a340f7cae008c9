"""Which precision inference runs in: bf16 where the hardware has it natively and it gives the same answers.

``model.precision = "auto"`` picks bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16
or AMX tiles, through oneDNN) only after a self-check: the loaded model answers a built-in
phantom (``phantoms.ctpa``, a small CTPA with central and right-sided clots and a dilated RV) in
fp32 and in bf16, and bf16 is kept only when every reported probability (the nine exam labels and
the series PE probability) is within ``MAX_PROBABILITY_DIFFERENCE`` of fp32 and the consistent
labels (hence the flags built from them) are the same. Otherwise fp32. ``"fp32"`` and ``"bf16"``
are taken as asked, without a check. The decision and its reason travel with every Prediction.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import Tensor

from pe_model.preprocessing import PreprocessConfig, preprocess
from pe_model.volume import Volume

log = structlog.get_logger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Largest difference of any reported probability between bf16 and fp32 that "auto" accepts.
MAX_PROBABILITY_DIFFERENCE = 0.02
#: /proc/cpuinfo flags of native bf16 arithmetic (AVX512-BF16 dot products, AMX bf16 tiles).
NATIVE_BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")

#: What the model answers for one series: (probabilities by label, consistent labels, PE present).
Answer = tuple[Mapping[str, float], Mapping[str, bool], bool]
#: Runs the model on preprocessed chunks at an autocast dtype (None: fp32) and returns its answer.
AnswerFunction = Callable[[Tensor, "torch.dtype | None"], Answer]


@dataclass(frozen=True)
class SelfCheck:
    """bf16 against fp32 on the built-in phantom."""

    max_probability_difference: float
    #: The label whose probability differs most.
    worst_label: str
    same_labels: bool
    seconds: float

    @property
    def passed(self) -> bool:
        return self.same_labels and self.max_probability_difference <= MAX_PROBABILITY_DIFFERENCE


@dataclass(frozen=True)
class PrecisionDecision:
    """The precision asked for, the one used, and why."""

    requested: str
    precision: str  # "fp32" | "bf16"
    reason: str
    check: SelfCheck | None = None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and what says so."""
    if device.type == "cuda":
        supported = bool(torch.cuda.is_bf16_supported())
        return supported, "CUDA device with bf16" if supported else "CUDA device without bf16"
    present = sorted((cpu_flags() if flags is None else flags) & set(NATIVE_BF16_CPU_FLAGS))
    if present:
        return True, "CPU has " + "+".join(present)
    return False, "CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"


@functools.lru_cache(maxsize=4)
def self_check_chunks(config: PreprocessConfig) -> Tensor:
    """The built-in phantom, preprocessed as the model expects: chunks (N, 3, D, S, S) uint8.

    A 64 x 64 x 32 ``phantoms.ctpa`` series (2.6 mm pixels, 2.5 mm slices; the anatomy is scaled
    to the scan, so the whole chest is there in about 8 chunks) with central and
    right-sided clots and an RV/LV ratio of 1.3: a positive exam with every kind of label set.
    """
    from phantoms import PhantomSpec, generate_volume

    spec = PhantomSpec(n_slices=32, rows=64, columns=64, locations=("central", "right"), rv_lv_ratio=1.3,
                       seed=20261205, patient_id="SELF-CHECK")
    voxels, geometry, _ = generate_volume(spec)
    positions = np.asarray(geometry.image_positions_patient, dtype=np.float64)
    volume = Volume(
        voxels=voxels,
        positions_mm=positions[:, 2].copy(),
        image_positions=positions,
        orientation=np.asarray(geometry.image_orientation_patient, dtype=np.float64),
        pixel_spacing_mm=geometry.pixel_spacing_mm,
        sop_instance_uids=tuple(f"2.25.{k + 1}" for k in range(spec.n_slices)),
        frame_numbers=(None,) * spec.n_slices,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        slice_thickness_mm=geometry.slice_thickness_mm,
        skipped=(),
    )
    return preprocess(volume, config).chunks


def compare(fp32: Answer, bf16: Answer, seconds: float = 0.0) -> SelfCheck:
    """How far the bf16 answer is from the fp32 one."""
    probabilities32, labels32, present32 = fp32
    probabilities16, labels16, present16 = bf16
    differences = {k: abs(float(probabilities16[k]) - float(v)) for k, v in probabilities32.items()}
    worst = max(differences, key=lambda k: differences[k])
    same = present32 == present16 and dict(labels32) == dict(labels16)
    return SelfCheck(max_probability_difference=differences[worst], worst_label=worst, same_labels=same,
                     seconds=seconds)


def choose_precision(requested: str, device: torch.device, answer: AnswerFunction, config: PreprocessConfig,
                     *, flags: frozenset[str] | None = None) -> PrecisionDecision:
    """The precision to run in (see the module docstring). ``answer`` runs the loaded model."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    if requested != "auto":
        return PrecisionDecision(requested, requested, f"{requested} as configured")
    native, why = native_bf16(device, flags)
    if not native:
        return PrecisionDecision(requested, "fp32", f"auto: {why}")
    started = time.perf_counter()
    chunks = self_check_chunks(config)
    check = compare(answer(chunks, None), answer(chunks, torch.bfloat16), time.perf_counter() - started)
    detail = (f"self-check max probability difference {check.max_probability_difference:.4f} "
              f"({check.worst_label}), labels {'the same' if check.same_labels else 'differ'}")
    if check.passed:
        decision = PrecisionDecision(requested, "bf16", f"auto: {why}; bf16 {detail}", check)
    else:
        decision = PrecisionDecision(requested, "fp32", f"auto: {why}, but bf16 fails the {detail}", check)
    log.info("pe_model.precision", precision=decision.precision, reason=decision.reason,
             seconds=round(check.seconds, 2))
    return decision
