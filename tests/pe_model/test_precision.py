"""``precision = "auto"``: bf16 only on native-bf16 hardware and only when it answers as fp32 does."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pe_model.precision import (
    MAX_PROBABILITY_DIFFERENCE,
    Answer,
    choose_precision,
    compare,
    cpu_flags,
    native_bf16,
    self_check_chunks,
)
from pe_model.predictor import Predictor
from pe_model.volume import load_series
from phantoms import PhantomTruth

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NATIVE = frozenset({"avx512f", "avx512_bf16"})
EMULATED = frozenset({"avx2", "avx512f"})
CPU = torch.device("cpu")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    assert native_bf16(CPU, NATIVE) == (True, "CPU has avx512_bf16")
    assert native_bf16(CPU, frozenset({"amx_bf16", "amx_tile"}))[0]
    supported, why = native_bf16(CPU, EMULATED)
    assert not supported and "neither AVX512-BF16 nor AMX" in why
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_explicit_precisions_are_taken_as_asked(tiny_checkpoint: Path) -> None:
    for asked in ("fp32", "bf16"):
        predictor = Predictor.from_checkpoint(tiny_checkpoint, precision=asked)
        assert predictor.precision == asked and predictor.precision_decision.check is None
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("fp16", CPU, _never, _config(tiny_checkpoint))


def test_auto_without_native_bf16_is_fp32_without_running_the_model(tiny_checkpoint: Path) -> None:
    decision = choose_precision("auto", CPU, _never, _config(tiny_checkpoint), flags=EMULATED)
    assert decision.precision == "fp32" and decision.check is None
    assert "neither AVX512-BF16 nor AMX" in decision.reason


def test_auto_on_native_bf16_runs_the_self_check_and_records_it(
    tiny_checkpoint: Path, phantom_series: tuple[Path, PhantomTruth]
) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32")
    decision = choose_precision("auto", CPU, predictor._answer, predictor.preprocess_config, flags=NATIVE)
    assert decision.check is not None
    assert decision.check.max_probability_difference <= MAX_PROBABILITY_DIFFERENCE and decision.check.same_labels
    assert decision.precision == "bf16" and "self-check" in decision.reason
    if native_bf16(CPU)[0]:
        # On this machine's own flags the predictor decides the same, and says so in its output.
        auto = Predictor.from_checkpoint(tiny_checkpoint)
        assert auto.precision == "bf16" and auto.precision_decision.check is not None
        prediction = auto.predict(load_series(phantom_series[0]))
        assert prediction.precision == "bf16" and prediction.to_json_dict()["precision"] == "bf16"


def test_auto_falls_back_to_fp32_when_bf16_answers_differently(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_checkpoint(tiny_checkpoint, precision="fp32")

    def drifting(chunks: Tensor, dtype: torch.dtype | None) -> Answer:
        probabilities, labels, present = predictor._answer(chunks, dtype)
        if dtype is None:
            return probabilities, labels, present
        shifted = {k: min(1.0, v + 0.05) for k, v in probabilities.items()}
        return shifted, labels, present

    decision = choose_precision("auto", CPU, drifting, predictor.preprocess_config, flags=NATIVE)
    assert decision.precision == "fp32" and decision.check is not None and not decision.check.passed
    assert "fails" in decision.reason


def test_compare_flags_a_changed_label_even_with_close_probabilities() -> None:
    probabilities: Mapping[str, float] = {"pe": 0.5, "central_pe": 0.2}
    same = compare((probabilities, {"central_pe": False}, True), ({"pe": 0.51, "central_pe": 0.2}, {"central_pe": False}, True))
    assert same.passed and same.max_probability_difference == pytest.approx(0.01) and same.worst_label == "pe"
    flipped = compare((probabilities, {"central_pe": False}, True), (probabilities, {"central_pe": True}, True))
    assert not flipped.passed and flipped.max_probability_difference == 0.0


def test_the_self_check_phantom_is_a_small_positive_series(tiny_checkpoint: Path) -> None:
    chunks = self_check_chunks(_config(tiny_checkpoint))
    assert chunks.dtype == torch.uint8 and chunks.ndim == 5 and 4 <= chunks.shape[0] <= 20
    assert self_check_chunks(_config(tiny_checkpoint)) is chunks, "built once per preprocessing"


def _config(checkpoint: Path):  # type: ignore[no-untyped-def]
    from pe_model.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).preprocess_config


def _never(chunks: Tensor, dtype: torch.dtype | None) -> Answer:
    raise AssertionError("the model must not run for this decision")
