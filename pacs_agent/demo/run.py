"""`pe-agent demo`: the whole loop on one machine, with an embedded PACS and synthetic CTPAs.

In a work folder it writes an agent config, starts a PACS (Orthanc when its binary is installed,
otherwise a pynetdicom storage SCP run here), starts ``pe-agent serve`` as a subprocess, draws three
phantom series (PE with RV strain, no PE, a non-contrast head CT), sends them with a real C-STORE,
waits until each one is reported at the PACS or ignored by the agent, prints one table row per
series, saves the Grad-CAM secondary captures that reached the PACS as PNG files, and stops
everything. Exit codes: 0 done, 1 failure (one line says where the logs are), 2 usage, 130
interrupted (Ctrl-C or SIGTERM; the agent and the PACS are stopped, no process is left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from PIL import Image
from pynetdicom import AE
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacs_agent.db.models import DeliveryStatus, Job, JobStatus, OutputKind, Series, SeriesState
from pacs_agent.db.session import make_engine
from pacs_agent.delivery.dimse import echo
from pacs_agent.errors import AgentError
from pacs_agent.demo.pacs import DemoError, EmbeddedPACS, OrthancPACS, PacsObject, StorageSCP, free_port, orthanc_binary
from pacs_agent.demo.processes import stop_process_group
from pacs_agent.settings import DestinationSettings
from phantoms import PhantomSpec, PhantomTruth, write_phantom_series

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

AGENT_AE_TITLE = "PE_AGENT"
BUILTIN_DEMO = "builtin:demo"
BANNER = (
    "DEMONSTRATION with synthetic CT phantoms and a synthetic model - NOT FOR CLINICAL USE.\n"
    "Every finding below is unverified AI output made on invented images."
)


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class DemoOptions:
    """What the command line asked for."""

    workdir: Path | None = None
    keep: bool = False
    timeout_s: float = 300.0
    #: "auto" (Orthanc when installed), "orthanc" or "scp".
    pacs: str = "auto"
    checkpoint: str = BUILTIN_DEMO
    rows: int = 128
    slices: int = 120
    quiet_seconds: float | None = None


@dataclass(frozen=True)
class DemoCase:
    """One phantom series the demo sends, and what a reader should expect of it."""

    key: str
    spec: PhantomSpec
    truth_text: str


@dataclass(frozen=True)
class SentSeries:
    case: DemoCase
    truth: PhantomTruth
    #: UTC time the PACS side saw the C-STORE response of the last image.
    last_acknowledged_at: datetime


@dataclass(frozen=True)
class SeriesOutcome:
    """Where one sent series stands (read from the agent's database and the PACS)."""

    state: str
    final: bool = False
    flag: str = ""
    pe_probability: float | None = None
    objects: dict[str, int] = field(default_factory=dict)
    seconds_to_pacs: float | None = None
    note: str = ""
    secondary_captures: tuple[PacsObject, ...] = ()
    #: "name version (sha256 prefix)" of the model that made the result.
    model: str = ""


class AgentProcess:
    """``pe-agent serve --config FILE`` in its own session, its logs (JSON) in a file."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pacs_agent.node.cli", *args, "--config", str(self.config_path)]

    def start(self) -> None:
        # The demo's config is the whole truth: a developer's PE_AGENT__* overrides must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PE_AGENT_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command("serve"), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def wait_ready(self, port: int, *, calling_ae_title: str, timeout_s: float) -> None:
        """C-ECHO the agent until it answers; its exit or the timeout is a DemoError."""
        agent = DestinationSettings(name="agent", ae_title=AGENT_AE_TITLE, host="127.0.0.1", port=port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise DemoError(f"the agent stopped at start (exit code {code}); see {self.log_path}")
            if echo(agent, calling_ae_title=calling_ae_title, timeout=5.0).ok:
                return
            time.sleep(0.3)
        raise DemoError(f"the agent did not answer C-ECHO within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self._process is not None:
            stop_process_group(self._process, grace_s=20)
            self._process = None


# ---------------------------------------------------------------- cases and config


def demo_cases(rows: int, slices: int) -> tuple[DemoCase, ...]:
    """The three phantom series: each its own patient and study."""
    return (
        DemoCase(
            "pe_rv_strain",
            PhantomSpec(pe=True, locations=("central", "left", "right"), rv_lv_ratio=1.3, seed=101,
                        series_description="CTPA demo - PE with RV strain", patient_name="DEMO^PE", patient_id="DEMO-0001", rows=rows, columns=rows, n_slices=slices),
            "PE central+left+right, RV/LV 1.3",
        ),
        DemoCase(
            "no_pe",
            PhantomSpec(pe=False, rv_lv_ratio=0.8, seed=102, series_description="CTPA demo - no PE",
                        patient_name="DEMO^NEGATIVE", patient_id="DEMO-0002", rows=rows, columns=rows, n_slices=slices),
            "no PE",
        ),
        DemoCase(
            "head_ct",
            PhantomSpec(kind="head", pe=False, contrast=False, seed=103, series_description="CT HEAD without contrast",
                        patient_name="DEMO^HEAD", patient_id="DEMO-0003", rows=rows, columns=rows, n_slices=slices),
            "head CT, no contrast (to be ignored)",
        ),
    )


def _toml_string(value: str) -> str:
    return json.dumps(value)


def write_agent_config(
    path: Path, *, workdir: Path, agent_port: int, pacs: EmbeddedPACS, checkpoint: str, quiet_seconds: float | None,
    http_port: int = 0,
) -> None:
    """Defaults, with a spool and database in the work folder, free ports and the PACS as destination;
    with ``http_port``, the node's HTTP server (dashboard, /healthz, /metrics) on loopback there."""
    lines = [
        "# Written by `pe-agent demo`.",
        "[node]",
        f"ae_title = {_toml_string(AGENT_AE_TITLE)}",
        'host = "127.0.0.1"',
        f"port = {agent_port}",
        f"allowed_calling_ae_titles = [{_toml_string(pacs.ae_title)}]",
        "min_free_disk_mb = 64",
        "",
        "[storage]",
        f"root = {_toml_string(str(workdir / 'spool'))}",
        "",
        "[database]",
        f"url = {_toml_string('sqlite:///' + str(workdir / 'agent.sqlite'))}",
        "",
        "[model]",
        f"checkpoint = {_toml_string(checkpoint)}",
        "",
        "[dispatch]",
        "poll_seconds = 0.5",
        "",
        "[log]",
        'format = "json"',
        "",
        "[[destinations]]",
        'name = "pacs"',
        f"ae_title = {_toml_string(pacs.ae_title)}",
        'host = "127.0.0.1"',
        f"port = {pacs.port}",
        "",
    ]
    if http_port:
        lines[lines.index("[log]"):lines.index("[log]")] = [
            "[http]", "enabled = true", 'host = "127.0.0.1"', f"port = {http_port}",
            f"public_url = {_toml_string(f'http://127.0.0.1:{http_port}')}", "",
        ]
    if quiet_seconds is not None:
        lines[lines.index("[dispatch]"):lines.index("[dispatch]")] = ["[series]", f"quiet_seconds = {quiet_seconds}", ""]
    path.write_text("\n".join(lines))


def prepare_checkpoint(ref: str, model_dir: Path, console: Console) -> str:
    """``builtin:demo`` when installed; otherwise an untrained checkpoint built here, said loudly."""
    from pe_model.checkpoint import build_initial_checkpoint, builtin_demo_path

    if ref != BUILTIN_DEMO:
        if not Path(ref).is_file():
            raise DemoError(f"checkpoint {ref} does not exist")
        return str(Path(ref).resolve())
    if builtin_demo_path().is_file():
        return BUILTIN_DEMO
    from pe_model.preprocessing import PreprocessConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "untrained.pt"
    build_initial_checkpoint(path, encoder_width=8, preprocess_config=PreprocessConfig(input_size=64))
    console.print("[yellow]The built-in demo checkpoint is not installed: using an UNTRAINED random model; its findings mean nothing.[/]")
    return str(path)


# ---------------------------------------------------------------- sending


def send_series(
    truth: PhantomTruth, *, port: int, calling_ae_title: str, progress: Progress, task: Any
) -> datetime:
    """C-STORE every file of the series to the agent in one association; returns when the last was acknowledged."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=AGENT_AE_TITLE)
    if not assoc.is_established:
        raise DemoError(f"the agent refused the association for series {truth.spec.series_description!r}")
    last = datetime.now(timezone.utc)
    try:
        for path in truth.files:
            status = assoc.send_c_store(path)
            code = int(status.Status) if status else None
            if code != 0:
                shown = "no answer" if code is None else f"status 0x{code:04X}"
                raise DemoError(f"the agent refused an image of {truth.spec.series_description!r} ({shown})")
            last = datetime.now(timezone.utc)
            progress.advance(task)
    finally:
        assoc.release()
    return last


# ---------------------------------------------------------------- watching


def _latest_job(series: Series) -> Job | None:
    return series.jobs[-1] if series.jobs else None


def outcome_of(session: Session, pacs: EmbeddedPACS, sent: SentSeries) -> SeriesOutcome:
    """Read one series' progress from the agent's database and the PACS."""
    uid = sent.truth.series_instance_uid
    series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
    if series is None:
        return SeriesOutcome(state="waiting for the receiver")
    if series.state == SeriesState.IGNORED:
        return SeriesOutcome(state="ignored", final=True, flag="IGNORED", note=series.ignore_reason)
    if series.state in (SeriesState.RECEIVING, SeriesState.COMPLETE):
        return SeriesOutcome(state=f"received {series.instance_count} images, waiting for the quiet period")
    job = _latest_job(series)
    if job is None:
        return SeriesOutcome(state=series.state.value.lower())
    if job.status == JobStatus.FAILED or series.state == SeriesState.FAILED:
        return SeriesOutcome(state="analysis failed", final=True, flag="ERROR", note=job.error)
    if job.status == JobStatus.CANCELLED:
        return SeriesOutcome(state="cancelled", final=True, flag="", note="job cancelled")
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return SeriesOutcome(state="queued" if job.status == JobStatus.QUEUED else "analysing")
    result = job.result
    flag = result.flag.value if result is not None else ""
    probability = result.pe_probability if result is not None else None
    outputs = list(job.outputs)
    deliveries = [d for o in outputs for d in o.deliveries]
    failed = [d for d in deliveries if d.status == DeliveryStatus.FAILED]
    at_pacs = pacs.study_objects(sent.truth.study_instance_uid)
    present = [o for o in outputs if o.sop_instance_uid in at_pacs]
    objects: dict[str, int] = {}
    for output in present:
        objects[output.kind.value] = objects.get(output.kind.value, 0) + 1
    secondary = tuple(at_pacs[o.sop_instance_uid] for o in present if o.kind == OutputKind.SC)
    model = f"{result.model_name} {result.model_version} (sha256 {result.model_sha256[:12]})" if result is not None else ""
    base = SeriesOutcome(state="", flag=flag, pe_probability=probability, objects=objects, secondary_captures=secondary, model=model)
    if failed:
        return replace(base, state="delivery failed", final=True, note=failed[0].last_error or "delivery to PACS failed")
    if outputs and len(present) == len(outputs) and all(d.status == DeliveryStatus.DELIVERED for d in deliveries):
        delivered = [d.delivered_at for d in deliveries if d.delivered_at is not None]
        seconds = (max(delivered) - sent.last_acknowledged_at).total_seconds() if delivered else None
        return replace(base, state="reported at PACS", final=True, seconds_to_pacs=seconds)
    return replace(base, state=f"sending to PACS ({len(present)}/{len(outputs)} there)")


def _objects_text(objects: dict[str, int]) -> str:
    return " + ".join(f"{count} {kind}" for kind, count in sorted(objects.items(), key=lambda kv: ("SR", "SC", "SEG").index(kv[0]))) or "0"


def results_table(sent: Sequence[SentSeries], outcomes: dict[str, SeriesOutcome]) -> Table:
    table = Table(title="PE triage demo - one row per series (synthetic model, NOT FOR CLINICAL USE)", title_justify="left")
    for column in ("Series", "Phantom truth", "Flag", "PE probability", "Objects at PACS", "Last image -> report at PACS (s)", "Note"):
        table.add_column(column, overflow="fold")
    for item in sent:
        outcome = outcomes[item.case.key]
        table.add_row(
            item.case.spec.series_description,
            item.case.truth_text,
            outcome.flag or outcome.state,
            "" if outcome.pe_probability is None else f"{outcome.pe_probability:.3f}",
            _objects_text(outcome.objects) if outcome.flag != "IGNORED" else "-",
            "" if outcome.seconds_to_pacs is None else f"{outcome.seconds_to_pacs:.1f}",
            outcome.note,
        )
    return table


def save_pngs(pacs: EmbeddedPACS, sent: Sequence[SentSeries], outcomes: dict[str, SeriesOutcome], out_dir: Path) -> list[Path]:
    """Each Grad-CAM secondary capture the PACS holds, read back from the PACS, as a PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for item in sent:
        for index, obj in enumerate(outcomes[item.case.key].secondary_captures, start=1):
            dataset = pacs.read(obj)
            pixels = dataset.pixel_array
            if getattr(dataset, "PhotometricInterpretation", "") in ("YBR_FULL", "YBR_FULL_422"):
                from pydicom.pixels import convert_color_space

                pixels = convert_color_space(pixels, dataset.PhotometricInterpretation, "RGB")
            if pixels.ndim == 4:
                pixels = pixels[0]
            image = Image.fromarray(pixels.astype("uint8")) if pixels.dtype != "uint8" else Image.fromarray(pixels)
            path = out_dir / f"{item.case.key}_gradcam_{index}.png"
            image.save(path)
            paths.append(path)
    return paths


def summary_dict(sent: Sequence[SentSeries], outcomes: dict[str, SeriesOutcome], pngs: Sequence[Path], pacs: EmbeddedPACS) -> dict[str, Any]:
    return {
        "pacs": pacs.name,
        "series": [
            {
                "key": item.case.key,
                "series_description": item.case.spec.series_description,
                "series_instance_uid": item.truth.series_instance_uid,
                "study_instance_uid": item.truth.study_instance_uid,
                "truth": item.case.truth_text,
                "state": outcomes[item.case.key].state,
                "flag": outcomes[item.case.key].flag,
                "pe_probability": outcomes[item.case.key].pe_probability,
                "objects_at_pacs": outcomes[item.case.key].objects,
                "seconds_last_image_to_pacs": outcomes[item.case.key].seconds_to_pacs,
                "note": outcomes[item.case.key].note,
                "model": outcomes[item.case.key].model,
            }
            for item in sent
        ],
        "png": [str(p) for p in pngs],
    }


# ---------------------------------------------------------------- the run


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C, so the same clean-up runs."""

    def _handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping the agent and the PACS, a second Ctrl-C must not cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _make_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=200, color_system=None)
    return console


class _Demo:
    def __init__(self, options: DemoOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.workdir = (options.workdir or Path(tempfile.mkdtemp(prefix="pe-agent-demo-"))).resolve()
        self.logs = self.workdir / "logs"
        self.output = self.workdir / "output"
        self.pacs: EmbeddedPACS | None = None
        self.agent: AgentProcess | None = None
        self.engine: Engine | None = None
        self.agent_port = 0

    def _choose_pacs(self, agent_port: int) -> EmbeddedPACS:
        binary = orthanc_binary()
        if self.options.pacs == "orthanc" and binary is None:
            raise DemoError("--pacs orthanc: the Orthanc binary is not installed (Debian package orthanc)")
        if self.options.pacs != "scp" and binary is not None:
            return OrthancPACS(self.workdir / "pacs", self.logs / "orthanc.log", binary=binary, agent_port=agent_port)
        return StorageSCP(self.workdir / "pacs", self.logs / "pacs.log")

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.console.print(Panel(BANNER, title="pe-agent demo", border_style="red"))
        self.console.print(f"Work folder: {self.workdir}")
        checkpoint = prepare_checkpoint(self.options.checkpoint, self.workdir / "model", self.console)
        agent_port = self.agent_port = free_port()
        self.pacs = self._choose_pacs(agent_port)
        with self.console.status(f"Starting the embedded PACS ({self.pacs.name})..."):
            self.pacs.start()
        self.console.print(f"PACS: {self.pacs.name}, AE {self.pacs.ae_title} on 127.0.0.1:{self.pacs.port}")
        config_path = self.workdir / "agent.toml"
        http_port = free_port()
        write_agent_config(config_path, workdir=self.workdir, agent_port=agent_port, pacs=self.pacs,
                           checkpoint=checkpoint, quiet_seconds=self.options.quiet_seconds, http_port=http_port)
        self.agent = AgentProcess(config_path, self.logs / "agent.log")
        with self.console.status("Starting the agent (pe-agent serve)..."):
            self.agent.start()
            self.agent.wait_ready(agent_port, calling_ae_title=self.pacs.ae_title, timeout_s=min(120.0, self.options.timeout_s))
        self.console.print(f"Agent: AE {AGENT_AE_TITLE} on 127.0.0.1:{agent_port}, config {config_path}, logs {self.agent.log_path}")
        deadline = time.monotonic() + self.options.timeout_s
        cases = demo_cases(self.options.rows, self.options.slices)
        sent = self._send(cases)
        outcomes = self._wait(sent, deadline)
        self.console.print(results_table(sent, outcomes))
        for model in sorted({o.model for o in outcomes.values() if o.model}):
            self.console.print(f"Model: {model} - synthetic, NOT FOR CLINICAL USE")
        pngs = save_pngs(self.pacs, sent, outcomes, self.output)
        for path in pngs:
            self.console.print(f"Grad-CAM secondary capture: {path}")
        summary_path = self.output / "summary.json"
        summary_path.write_text(json.dumps(summary_dict(sent, outcomes, pngs, self.pacs), indent=2))
        self.console.print(f"Summary: {summary_path}")
        if self.options.keep:
            return self._keep_running(config_path, http_port)
        return EXIT_OK

    def _keep_running(self, config_path: Path, http_port: int) -> int:
        """--keep: leave the PACS and the node up to be looked at, print where, stop on Ctrl-C/SIGTERM."""
        assert self.pacs is not None and self.agent is not None
        self.console.print("The PACS and the node keep running (--keep); Ctrl-C stops both.", soft_wrap=True)
        self.console.print(f"Dashboard: http://127.0.0.1:{http_port}/", soft_wrap=True)
        if isinstance(self.pacs, OrthancPACS):
            self.console.print(f"Orthanc Explorer: {self.pacs.url}/app/explorer.html", soft_wrap=True)
        elif isinstance(self.pacs, StorageSCP):
            self.console.print(f"PACS: storage SCP AE {self.pacs.ae_title} at 127.0.0.1:{self.pacs.port}, files in {self.pacs.root}",
                               soft_wrap=True)
        self.console.print(f"Node: DICOM AE {AGENT_AE_TITLE} at 127.0.0.1:{self.agent_port}; "
                           f"try `pe-agent worklist -c {config_path}`", soft_wrap=True)
        try:
            while True:
                code = self.agent.exit_code()
                if code is not None:
                    raise DemoError(f"the agent stopped (exit code {code}); see {self.agent.log_path}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            return EXIT_OK  # the end a --keep run waits for

    def _send(self, cases: Sequence[DemoCase]) -> list[SentSeries]:
        assert self.pacs is not None
        sent: list[SentSeries] = []
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            for case in cases:
                truth = write_phantom_series(self.workdir / "phantoms" / case.key, case.spec)
                task = progress.add_task(f"C-STORE {case.spec.series_description}", total=len(truth.files))
                try:
                    acknowledged = send_series(truth, port=self.agent_port, calling_ae_title=self.pacs.ae_title, progress=progress, task=task)
                except DemoError:
                    code = self.agent.exit_code() if self.agent is not None else None
                    if code is not None:
                        raise DemoError(f"the agent stopped while images were being sent (exit code {code}); see {self.logs}") from None
                    raise
                sent.append(SentSeries(case, truth, acknowledged))
        return sent

    def _wait(self, sent: Sequence[SentSeries], deadline: float) -> dict[str, SeriesOutcome]:
        assert self.pacs is not None and self.agent is not None
        self.engine = make_engine("sqlite:///" + str(self.workdir / "agent.sqlite"))
        outcomes = {item.case.key: SeriesOutcome(state="sent") for item in sent}
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("[bold]{task.fields[state]}"), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            tasks = {item.case.key: progress.add_task(item.case.spec.series_description, total=1, state="sent") for item in sent}
            while True:
                code = self.agent.exit_code()
                if code is not None:
                    raise DemoError(f"the agent stopped while the demo was waiting (exit code {code}); see {self.agent.log_path}")
                with Session(self.engine) as session:
                    for item in sent:
                        if outcomes[item.case.key].final:
                            continue
                        outcome = outcome_of(session, self.pacs, item)
                        outcomes[item.case.key] = outcome
                        progress.update(tasks[item.case.key], state=f"{outcome.flag}: {outcome.state}" if outcome.final and outcome.flag else outcome.state,
                                        completed=1 if outcome.final else 0)
                if all(o.final for o in outcomes.values()):
                    return outcomes
                if time.monotonic() > deadline:
                    pending = ", ".join(f"{i.case.spec.series_description!r} ({outcomes[i.case.key].state})" for i in sent if not outcomes[i.case.key].final)
                    raise DemoError(f"timed out after {self.options.timeout_s:.0f} s waiting for {pending}; see {self.logs}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.pacs is not None:
            self.pacs.stop()
            self.pacs = None

    def tidy(self) -> None:
        """After a successful run: drop the bulky parts, keep config, logs and output."""
        if self.options.keep:
            return
        for name in ("spool", "pacs", "phantoms", "model"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)


def execute(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo with parsed options; returns the exit code."""
    console = console or _make_console()
    demo = _Demo(options, console)
    code = EXIT_FAILURE
    try:
        with _sigterm_as_interrupt():
            try:
                code = demo.run()
            finally:
                with _signals_ignored(), console.status("Stopping the agent and the PACS..."):
                    demo.stop()
    except KeyboardInterrupt:
        console.print(f"Interrupted: the agent and the PACS are stopped. Work folder: {demo.workdir}")
        return EXIT_INTERRUPTED
    except (DemoError, AgentError, OSError) as exc:
        message = str(exc) if str(demo.logs) in str(exc) else f"{exc}; see {demo.logs}"
        console.print(f"[red]demo failed:[/] {message}", soft_wrap=True)
        return EXIT_FAILURE
    if code == EXIT_OK:
        demo.tidy()
        console.print(f"Done. Logs: {demo.logs}  Output: {demo.output}")
    return code


_command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@_command.command()
def _demo(
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Work folder (default: a new temporary folder).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="After a successful run, leave the PACS and the node (dashboard) running until Ctrl-C, and keep spool, PACS storage and phantoms.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=10, help="Seconds from the agent answering until every series is reported or ignored.")] = 300.0,
    pacs: Annotated[str, typer.Option("--pacs", help="auto (Orthanc when installed), orthanc or scp.")] = "auto",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Model checkpoint path (default: builtin:demo).")] = BUILTIN_DEMO,
    rows: Annotated[int, typer.Option("--rows", min=32, max=512, help="Phantom rows and columns.")] = 128,
    slices: Annotated[int, typer.Option("--slices", min=40, max=400, help="Phantom slices per series.")] = 120,
    quiet_seconds: Annotated[float | None, typer.Option("--quiet-seconds", min=0.5, help="Series quiet period (default: the agent's).")] = None,
) -> int:
    """Run the whole loop on this machine with a built-in PACS and synthetic CTPAs."""
    if pacs not in ("auto", "orthanc", "scp"):
        raise typer.BadParameter("must be auto, orthanc or scp", param_hint="--pacs")
    options = DemoOptions(workdir=workdir, keep=keep, timeout_s=timeout, pacs=pacs, checkpoint=checkpoint,
                          rows=rows, slices=slices, quiet_seconds=quiet_seconds)
    raise typer.Exit(execute(options))


def run_demo(argv: Sequence[str] | None = None) -> int:
    """Entry point used by `pe-agent demo ARGS`; returns the exit code (usage errors: 2)."""
    command = typer.main.get_command(_command)
    try:
        command.main(args=list(argv or []), prog_name="pe-agent demo", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return EXIT_OK
        return code if isinstance(code, int) else EXIT_FAILURE
    return EXIT_OK
