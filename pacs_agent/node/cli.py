"""`pe-agent`: run the node and steer it (status, jobs, worklist, reprocess, retry, cancel, echo, analyze,
notifications, ack).

Exit codes: 0 ok, also when there was nothing to do; 1 operational failure (echo failed, what was
asked could not be done, a worker crashed); 2 usage, configuration or input error (also: no
database yet). Expected conditions print one line on stderr, never a traceback. Every command takes
``-c/--config FILE`` (default: $PE_AGENT_CONFIG); read commands take ``--json``, with one JSON shape
per resource (docs/CLI.md). Enumerated option values ignore case.
"""

from __future__ import annotations

import dataclasses
import getpass
import importlib.metadata
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.db.migrate import SchemaOutOfDateError, check_schema_at_head, current_revision, head_revision, upgrade_database
from pacs_agent.db.models import (
    Delivery,
    DeliveryStatus,
    NotificationStatus,
    Event,
    Flag,
    Job,
    JobStatus,
    Series,
    SeriesState,
    utcnow,
)
from pacs_agent.db.session import make_engine, make_session_factory, transaction
from pacs_agent.errors import AgentError, ConfigError, DeliveryError, NotificationError, QueueError, ReportError
from pacs_agent.node import admin
from pacs_agent.settings import DestinationSettings, Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(AgentError):
    """The command line names something that does not exist or makes no sense (exit 2)."""


class OperationFailed(AgentError):
    """The command ran but what it tried did not work (exit 1)."""


app = typer.Typer(
    name="pe-agent",
    help="PE triage node beside PACS: receive CTPAs, analyse, send SR and Grad-CAM back, steer it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pe-agent {importlib.metadata.version('pe-triage')}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """PE triage node beside PACS: receive CTPAs, analyse, send SR and Grad-CAM back, steer it."""

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="PE_AGENT_CONFIG", help="TOML config file (default: $PE_AGENT_CONFIG).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# ---------------------------------------------------------------- helpers


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


@dataclass(frozen=True)
class _Database:
    engine: Engine
    factory: sessionmaker[Session]


def _require_database(settings: Settings) -> None:
    """Refuse, creating nothing, when the SQLite file does not exist: a read command on a machine
    without the node's database must say what to do, not leave an empty database behind."""
    url = make_url(settings.database.url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    if not Path(url.database).is_file():
        raise UsageError(
            f"there is no database at {url.database}: run `pe-agent db upgrade` with the node's configuration first, "
            "or name that configuration with -c/--config (or PE_AGENT_CONFIG)"
        )


@contextmanager
def _database(settings: Settings) -> Iterator[_Database]:
    """The node's database, refusing a missing one or an out-of-date schema (the fix is `pe-agent db upgrade`)."""
    _require_database(settings)
    engine = make_engine(settings.database.url)
    try:
        try:
            check_schema_at_head(engine)
        except OperationalError as exc:
            where = make_url(settings.database.url).render_as_string(hide_password=True)
            raise OperationFailed(f"cannot open the database {where}: {str(exc.orig).strip().splitlines()[0]}") from None
        yield _Database(engine=engine, factory=make_session_factory(engine))
    finally:
        engine.dispose()


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console = Console(width=240, color_system=None)  # pipes and captured output: no wrapping of UIDs
    return console


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    _console().print(table)


def _parse_since(value: str) -> datetime:
    """An ISO date/time (UTC if no zone) or a relative age like 2h, 30m, 1d."""
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return utcnow() - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since: {value!r} is neither an ISO date/time nor an age like 2h or 1d") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- run


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: DICOM receiver, scheduler, worker processes (and the HTTP server if enabled)."""
    from pacs_agent.node.service import serve as run_serve

    raise typer.Exit(run_serve(_settings(config)))


@app.command()
def worker(
    config: ConfigOption = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Worker processes (default: workers.count).")] = None,
) -> None:
    """Run analysis workers only (scale-out on another machine sharing the database and spool)."""
    from pacs_agent.node.service import run_workers

    raise typer.Exit(run_workers(_settings(config), count=count))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database schema to this build's revision."""
    settings = _settings(config)
    revision = upgrade_database(settings.database.url)
    typer.echo(f"database schema is at revision {revision}")


@db_app.command("current")
def db_current(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show the database's schema revision and this build's."""
    settings = _settings(config)
    current: str | None = None
    try:
        _require_database(settings)
    except UsageError:
        pass  # no database file yet: it is at no revision, and looking must not create it
    else:
        engine = make_engine(settings.database.url)
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
    head = head_revision()
    if as_json:
        _print_json({"current": current, "head": head, "up_to_date": current == head})
    else:
        typer.echo(f"current: {current or '(none)'}  head: {head}  {'up to date' if current == head else 'run `pe-agent db upgrade`'}")


# ---------------------------------------------------------------- read


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Queue depth, series states, deliveries, workers and worklist counts."""
    from pacs_agent.worklist import flag_counts

    settings = _settings(config)
    with _database(settings) as db, db.factory() as session:
        series_counts = admin.series_counts(session)
        delivery_counts = admin.delivery_counts(session)
        workers = admin.live_workers(session, settings.workers.heartbeat_seconds)
        job_counts = admin.job_counts(session)
        worklist_counts = flag_counts(session)
        data = {
            "schema_revision": head_revision(),
            "jobs": job_counts,
            "series": series_counts,
            "deliveries": delivery_counts,
            "worklist": worklist_counts,
            "workers": workers,
        }
    if as_json:
        _print_json(data)
        return
    _table("Jobs", list(job_counts), [list(job_counts.values())])
    _table("Series", list(series_counts), [list(series_counts.values())])
    _table("Deliveries", list(delivery_counts), [list(delivery_counts.values())])
    _table("Worklist", list(worklist_counts), [list(worklist_counts.values())])
    _table("Workers", ["id", "pid", "heartbeat", "job", "alive"],
           [[w["id"], w["pid"], _iso(w["heartbeat_at"]), w["current_job_id"], "yes" if w["alive"] else "NO"] for w in workers])


@app.command()
def jobs(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    status_filter: Annotated[
        list[JobStatus] | None, typer.Option("--status", "-s", case_sensitive=False, help="Only jobs in this status (repeatable).")
    ] = None,
    series_uid: Annotated[str | None, typer.Option("--series", help="Only jobs of this Series Instance UID.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 50,
) -> None:
    """List jobs, newest first."""
    settings = _settings(config)
    with _database(settings) as db, db.factory() as session:
        stmt = select(Job).join(Series).order_by(Job.id.desc()).limit(limit)
        if status_filter:
            stmt = stmt.where(Job.status.in_(status_filter))
        if series_uid:
            stmt = stmt.where(Series.series_instance_uid == series_uid)
        rows = [admin.job_dict(j) for j in session.scalars(stmt)]
    if as_json:
        _print_json(rows)
        return
    _table("Jobs", ["id", "status", "priority", "attempts", "reason", "series", "created", "error"],
           [[r["id"], r["status"], r["priority"], f"{r['attempts']}/{r['max_attempts']}", r["reason"],
             r["series_instance_uid"], _iso(r["created_at"]), r["error"]] for r in rows])


@app.command()
def show(
    target: Annotated[str, typer.Argument(help="A job id, a Series Instance UID or a Study Instance UID.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Everything about the series of a job, a series, or the series of a study: states, jobs with their
    results, outputs and deliveries, events. The JSON is always {"series": [series, ...]}."""
    settings = _settings(config)
    with _database(settings) as db, db.factory() as session:
        data: dict[str, Any]
        if target.isdigit():
            job = session.get(Job, int(target))
            if job is None:
                raise UsageError(f"job {target} does not exist")
            series_rows = [job.series]
        else:
            series_rows = list(session.scalars(select(Series).where(Series.series_instance_uid == target)))
            if not series_rows:
                series_rows = list(session.scalars(select(Series).where(Series.study_instance_uid == target).order_by(Series.id)))
            if not series_rows:
                raise UsageError(f"no job, series or study {target} is known to this node")
        data = {
            "series": [
                {
                    **admin.series_dict(s),
                    "jobs": [admin.job_detail(session, j) for j in s.jobs],
                    "events": [admin.event_dict(e) for e in session.scalars(
                        select(Event).where(Event.series_instance_uid == s.series_instance_uid).order_by(Event.id))],
                }
                for s in series_rows
            ]
        }
    if as_json:
        _print_json(data)
        return
    _render_show(data)


def _render_show(data: dict[str, Any]) -> None:
    for s in data["series"]:
        _table(f"Series {s['series_instance_uid']}", ["study", "state", "instances", "calling AE", "description", "ignore reason"],
               [[s["study_instance_uid"], s["state"], s["instance_count"], s["calling_ae_title"], s["series_description"], s["ignore_reason"]]])
        jobs = s["jobs"]
        _table("Jobs", ["id", "status", "attempts", "reason", "flag", "PE p", "error"],
               [[j["id"], j["status"], f"{j['attempts']}/{j['max_attempts']}", j["reason"],
                 (j["result"] or {}).get("flag", ""), _fmt_p((j["result"] or {}).get("pe_probability")), j["error"]] for j in jobs])
        skipped = [(j["id"], item) for j in jobs for item in ((j["result"] or {}).get("skipped_images") or [])]
        if skipped:
            _table("Images left out of the analysis", ["job", "SOP Instance UID", "reason"],
                   [[job_id, item["sop_instance_uid"], item["reason"]] for job_id, item in skipped])
        for j in jobs:
            _render_quality(j["id"], j["result"])
        deliveries = [(j["id"], o, d) for j in jobs for o in j["outputs"] for d in o["deliveries"]]
        if deliveries:
            _table("Deliveries", ["id", "job", "kind", "destination", "status", "attempts", "DICOM status", "error"],
                   [[d["id"], job_id, o["kind"], d["destination"], d["status"], d["attempts"], d["last_dicom_status"], d["last_error"]]
                    for job_id, o, d in deliveries])
        events = s["events"]
        _table("Events", ["at", "entity", "kind", "from", "to", "detail"],
               [[_iso(e["at"]), f"{e['entity']} {e['entity_id']}", e["kind"], e["from_state"], e["to_state"],
                 json.dumps(e["detail"], default=str) if e["detail"] else ""] for e in events])


def _fmt_p(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


#: Measurements of the input-quality gate shown by `show`, with their units.
_QUALITY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("pulmonary_trunk_hu", "pulmonary trunk", "HU"),
    ("brightest_mediastinal_hu", "brightest mediastinal structure", "HU"),
    ("lung_apex_covered", "lung apex covered", ""),
    ("lung_base_covered", "lung bases covered", ""),
    ("lung_extent_mm", "lung extent", "mm"),
    ("slice_thickness_mm", "slice thickness", "mm"),
    ("max_slice_gap_mm", "largest slice spacing", "mm"),
    ("noise_hu", "image noise (SD)", "HU"),
    ("contrast_to_noise", "trunk contrast-to-noise", ""),
)


def _render_quality(job_id: int, result: dict[str, Any] | None) -> None:
    """The result line and the input-quality gate's measurements of one job (nothing without a result)."""
    if not result:
        return
    quality = result.get("quality") or {}
    typer.echo(f"Job {job_id} result: {result.get('summary', '')}")
    if not quality:
        typer.echo("  input quality: not measured (analysed before the quality gate existed)")
        return
    typer.echo(f"  input quality: {quality.get('status', '')} - {quality.get('summary', '')}")
    rows = [[label, "not measured" if quality.get(key) is None else f"{quality[key]}{' ' + unit if unit else ''}"]
            for key, label, unit in _QUALITY_ROWS]
    _table(f"Input quality (job {job_id})", ["measurement", "value"], rows)


@app.command()
def worklist(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    flag: Annotated[list[Flag] | None, typer.Option("--flag", "-f", case_sensitive=False, help="Only studies with this flag (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1)] = None,
) -> None:
    """Studies by flag (CRITICAL, HIGH, ERROR, REVIEW, ROUTINE), then by arrival."""
    from pacs_agent.worklist import list_worklist

    settings = _settings(config)
    with _database(settings) as db, db.factory() as session:
        entries = list_worklist(session, flags=tuple(flag or ()), limit=limit)
    if as_json:
        _print_json([e.to_json_dict() for e in entries])
        return
    _table("Worklist", ["flag", "study", "accession", "PE p", "summary", "received"],
           [[e.flag.value, e.study_instance_uid, e.accession_number, _fmt_p(e.pe_probability), e.summary, _iso(e.first_received_at)]
            for e in entries])


# ---------------------------------------------------------------- change


@app.command()
def reprocess(
    series_uids: Annotated[list[str] | None, typer.Argument(help="Series Instance UIDs to analyse again.", show_default=False)] = None,
    config: ConfigOption = None,
    study: Annotated[list[str] | None, typer.Option("--study", help="Every analysed or failed series of this Study Instance UID (repeatable).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every series whose latest job failed.")] = False,
    since: Annotated[str | None, typer.Option("--since", help="Series received since (ISO date/time or age like 2h, 1d); analysed or failed ones.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a new analysis (reason "reprocess"); its report supersedes the series' last one."""
    from pacs_agent.jobs.queue import reprocess_series

    if not (series_uids or study or failed or since):
        raise UsageError("name series UIDs, --study, --failed or --since")
    settings = _settings(config)
    since_at = _parse_since(since) if since else None
    created: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with _database(settings) as db, transaction(db.factory) as session:
        selected: dict[int, Series] = {}
        for uid in series_uids or []:
            found = session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
            if found is None:
                raise UsageError(f"series {uid} is not known to this node")
            selected[found.id] = found
        for uid in study or []:
            rows = list(session.scalars(select(Series).where(Series.study_instance_uid == uid)))
            if not rows:
                raise UsageError(f"study {uid} is not known to this node")
            selected.update({s.id: s for s in rows if s.state in (SeriesState.ANALYSED, SeriesState.FAILED)})
        if failed:
            selected.update({s.id: s for s in session.scalars(select(Series).where(Series.state == SeriesState.FAILED))})
        if since_at is not None:
            stmt = select(Series).where(
                Series.last_received_at >= since_at, Series.state.in_((SeriesState.ANALYSED, SeriesState.FAILED))
            )
            selected.update({s.id: s for s in session.scalars(stmt)})
        for series in sorted(selected.values(), key=lambda s: s.id):
            try:
                with session.begin_nested():
                    job = reprocess_series(session, series, max_attempts=settings.workers.max_attempts)
                created.append({"job_id": job.id, "series_instance_uid": series.series_instance_uid, "supersedes_job_id": job.supersedes_job_id})
            except QueueError as exc:
                skipped.append({"series_instance_uid": series.series_instance_uid, "reason": str(exc)})
    if as_json:
        _print_json({"created": created, "skipped": skipped})
    else:
        for c in created:
            typer.echo(f"queued job {c['job_id']} for series {c['series_instance_uid']}"
                       + (f" (supersedes job {c['supersedes_job_id']})" if c["supersedes_job_id"] else ""))
        for s in skipped:
            typer.echo(f"skipped series {s['series_instance_uid']}: {s['reason']}", err=True)
    if not created and skipped:
        raise OperationFailed("nothing was queued")
    if not created and not as_json:
        typer.echo("nothing to reprocess")


@app.command()
def retry(
    delivery_ids: Annotated[list[int] | None, typer.Argument(help="Delivery ids to send again.", show_default=False)] = None,
    config: ConfigOption = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every FAILED delivery.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Also send DELIVERED ones again (the PACS lost the object).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Send deliveries again (FAILED ones, or the ids given) at the next dispatch round.

    Nothing to retry is not an error (exit 0); a named delivery that cannot be retried is (exit 1).
    """
    from pacs_agent.delivery.dispatcher import retry_deliveries

    if not delivery_ids and not failed:
        raise UsageError("name delivery ids or --failed")
    settings = _settings(config)
    skipped: list[dict[str, Any]] = []
    with _database(settings) as db, transaction(db.factory) as session:
        named: dict[int, DeliveryStatus] = {}
        if delivery_ids:
            named = {d.id: d.status for d in session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)))}
            missing = sorted(set(delivery_ids) - set(named))
            if missing:
                raise UsageError(f"no delivery with id {', '.join(map(str, missing))}")
        retryable = [DeliveryStatus.FAILED, DeliveryStatus.CANCELLED, DeliveryStatus.PENDING] + ([DeliveryStatus.DELIVERED] if force else [])
        for delivery_id, state in sorted(named.items()):
            if state not in retryable:
                reason = "already delivered; add --force to send it again" if state == DeliveryStatus.DELIVERED else "being sent right now"
                skipped.append({"id": delivery_id, "status": state.value, "reason": reason})
        wanted = [i for i, state in named.items() if state in retryable]
        if failed:
            wanted += [i for i in session.scalars(select(Delivery.id).where(Delivery.status == DeliveryStatus.FAILED)) if i not in wanted]
        if wanted:
            retry_deliveries(session, delivery_ids=wanted, force=force)
    requeued = sorted(wanted)
    if as_json:
        _print_json({"requeued": requeued, "skipped": skipped})
    else:
        if requeued:
            typer.echo(f"{len(requeued)} deliveries queued again: {', '.join(map(str, requeued))}")
        elif not skipped:
            typer.echo("nothing to retry")
        for item in skipped:
            typer.echo(f"delivery {item['id']} not queued: {item['reason']}", err=True)
    if skipped and not requeued:
        raise OperationFailed("no delivery was queued again")


@app.command()
def cancel(
    job_id: Annotated[int, typer.Argument(help="The job to cancel.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a QUEUED or RUNNING job (a running worker drops its result)."""
    from pacs_agent.jobs.queue import JobNotFoundError, cancel_job

    settings = _settings(config)
    with _database(settings) as db:
        try:
            with transaction(db.factory) as session:
                job = cancel_job(session, job_id, by="admin")
                state = job.status.value
        except JobNotFoundError as exc:
            raise UsageError(str(exc)) from None
        except QueueError as exc:
            raise OperationFailed(str(exc)) from None
    if as_json:
        _print_json({"job_id": job_id, "status": state})
    else:
        typer.echo(f"job {job_id} {state}")


@app.command()
def echo(
    destination: Annotated[str, typer.Argument(help="Destination name from the config.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1)] = 10.0,
) -> None:
    """Test a configured destination: C-ECHO (DIMSE) or a QIDO-RS search (STOW-RS)."""
    from pacs_agent.delivery.dimse import echo as c_echo

    settings = _settings(config)
    match = [d for d in settings.destinations if d.name == destination]
    if not match:
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        raise UsageError(f"no destination named {destination!r} ({names})")
    dest = match[0]
    if dest.kind == "stow-rs":
        _echo_stow_rs(settings, dest, timeout=timeout, as_json=as_json)
        return
    result = c_echo(
        dest, calling_ae_title=settings.dispatch.calling_ae_title or settings.node.ae_title, timeout=timeout,
        tls=settings.node.tls,
    )
    data = {
        "destination": dest.name, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port,
        "ok": result.ok, "status": result.status, "message": result.message, "seconds": round(result.seconds, 3),
    }
    if as_json:
        _print_json(data)
    else:
        typer.echo(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {'ok' if result.ok else 'FAILED'} - {result.message} ({result.seconds:.2f} s)")
    if not result.ok:
        raise typer.Exit(EXIT_FAILURE)


def _echo_stow_rs(settings: Settings, dest: DestinationSettings, *, timeout: float, as_json: bool) -> None:
    """`pe-agent echo` of a DICOMweb destination: QIDO-RS with its credentials and TLS settings."""
    import time

    from pacs_agent.delivery.stowrs import StowRsTarget

    started = time.monotonic()
    try:
        target = StowRsTarget.from_settings(replace(dest, timeout_seconds=timeout), settings)
    except DeliveryError as exc:
        raise UsageError(f"destination {dest.name}: {exc}") from None
    result = target.echo()
    seconds = time.monotonic() - started
    data = {"destination": dest.name, "kind": dest.kind, "url": dest.url, "ok": result.ok, "message": result.detail,
            "seconds": round(seconds, 3)}
    if as_json:
        _print_json(data)
    else:
        typer.echo(f"{dest.name} ({dest.url}): {'ok' if result.ok else 'FAILED'} - {result.detail} ({seconds:.2f} s)")
    if not result.ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command()
def analyze(
    directory: Annotated[Path, typer.Argument(help="A folder with the DICOM files of one series.")],
    config: ConfigOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write SR/SC here (default: DIRECTORY/../pe_reports).")] = None,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="Checkpoint path or builtin:demo (default: model.checkpoint).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Analyse one series from a folder: no network, no database; writes the SR and SC files."""
    settings = _settings(config)
    raise typer.Exit(run_analyze(settings, directory, out_dir=out, checkpoint=checkpoint, as_json=as_json))


# ---------------------------------------------------------------- notifications


@app.command()
def notifications(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    study: Annotated[str | None, typer.Option("--study", help="Only notifications of this Study Instance UID.")] = None,
    status_filter: Annotated[
        list[NotificationStatus] | None,
        typer.Option("--status", "-s", case_sensitive=False, help="Only notifications in this status (repeatable)."),
    ] = None,
    unacknowledged: Annotated[bool, typer.Option("--unacknowledged", help="Only alerts nobody has acknowledged yet.")] = False,
    attempts: Annotated[bool, typer.Option("--attempts", help="With each notification's attempts (what the receiver answered).")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 100,
) -> None:
    """Alerts and HL7 results sent (or being sent) about flagged studies, newest first."""
    from pacs_agent.notify.admin import list_notifications

    settings = _settings(config)
    with _database(settings) as db, db.factory() as session:
        rows = list_notifications(session, study_instance_uid=study, statuses=tuple(status_filter or ()),
                                  unacknowledged=unacknowledged, limit=limit, attempts=attempts)
    if as_json:
        _print_json(rows)
        return
    _table("Notifications", ["id", "flag", "target", "level", "status", "attempts", "study", "created", "acknowledged", "error"],
           [[r["id"], r["flag"], r["target"], r["escalation_level"], r["status"], r["attempts"], r["study_instance_uid"], r["created_at"][:19],
             f"{r['acknowledged']['by']} ({r['acknowledged']['via']})" if r["acknowledged"] else "", r["last_error"]] for r in rows])


@app.command()
def ack(
    notification_or_study: Annotated[str, typer.Argument(help="A notification id or a Study Instance UID.")],
    config: ConfigOption = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Who acknowledges (default: your login name).")] = None,
    note: Annotated[str, typer.Option("--note", help="A short note kept with the acknowledgement.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Acknowledge a flagged study's result: its alerts stop escalating."""
    from pacs_agent.notify import acknowledge

    settings = _settings(config)
    who = user if user is not None else getpass.getuser()
    with _database(settings) as db:
        try:
            with transaction(db.factory) as session:
                result = acknowledge(session, notification_or_study, who, "cli", note=note)
        except NotificationError as exc:
            raise UsageError(str(exc)) from None
    if as_json:
        _print_json(result.to_json_dict())
    elif result.already_acknowledged:
        typer.echo(f"study {result.study_instance_uid} was already acknowledged by {result.user} ({result.via}) at {_iso(result.at)}")
    else:
        typer.echo(f"study {result.study_instance_uid} acknowledged by {result.user}: "
                   f"{len(result.acknowledged_ids)} alert(s), {len(result.cancelled_ids)} pending escalation(s) cancelled")


@app.command("notify-test")
def notify_test(
    target: Annotated[str, typer.Argument(help="A [[notifications]] name from the config.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a test message to a notification target now (no study, no patient; nothing stored)."""
    from pacs_agent.notify.admin import send_test

    settings = _settings(config)
    match = [t for t in settings.notifications if t.name == target]
    if not match:
        names = ", ".join(t.name for t in settings.notifications) or "none configured"
        raise UsageError(f"no [[notifications]] entry named {target!r} ({names})")
    outcome = send_test(match[0], settings)
    if as_json:
        _print_json({"target": target, "kind": match[0].kind, "ok": outcome.ok, "status_code": outcome.status_code, "detail": outcome.detail})
    else:
        typer.echo(f"{target} ({match[0].kind}): {'ok' if outcome.ok else 'FAILED'} - {outcome.detail}")
    if not outcome.ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def demo(ctx: typer.Context) -> None:
    """Run the whole loop on this machine with a built-in PACS and synthetic CTPAs."""
    try:
        from pacs_agent.demo.run import run_demo  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        typer.echo("the demo is not available in this build", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    raise typer.Exit(int(run_demo(list(ctx.args)) or 0))


# ---------------------------------------------------------------- entry point


def run_analyze(settings: Settings, directory: Path, *, out_dir: Path | None, checkpoint: str | None, as_json: bool) -> int:
    """`pe-agent analyze`: 0 ok, 2 for a folder or series that cannot be analysed, 1 when writing fails."""
    from pacs_agent.analysis.pipeline import SourceReadError, analyze_sources, dicom_files, load_predictor, read_sources
    from pacs_agent.logs import configure_logging, log_context
    from pe_model.errors import CheckpointError, SeriesError

    # A one-shot command answers on stdout; its stderr carries warnings and errors only unless the
    # configuration asks for DEBUG (the precision chosen and the timings are in the answer).
    quiet = settings.log.level.upper() in ("INFO", "NOTSET")
    configure_logging(dataclasses.replace(settings.log, level="WARNING") if quiet else settings.log)
    if not directory.is_dir():
        print(f"pe-agent: {directory} is not a folder", file=sys.stderr)
        return 2
    out = out_dir if out_dir is not None else directory.resolve().parent / "pe_reports"
    try:
        sources = read_sources(dicom_files(directory), skip_non_dicom=True)
        if not sources:
            raise SourceReadError(f"{directory} holds no DICOM files")
        predictor = load_predictor(settings, checkpoint=checkpoint)
        with log_context(series_instance_uid=str(getattr(sources[0].header, "SeriesInstanceUID", ""))):
            outcome = analyze_sources(predictor, sources, settings.outputs, out, review_margin=settings.model.review_margin)
    except (SeriesError, CheckpointError, SourceReadError) as exc:
        print(f"pe-agent: cannot analyse {directory}: {exc}", file=sys.stderr)
        return 2
    except ReportError as exc:
        print(f"pe-agent: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(outcome.to_json_dict(), indent=2))
    else:
        print(outcome.summary(settings.model.review_margin))
    return 0


def _fail(message: str, code: int) -> int:
    typer.echo(f"pe-agent: {message}", err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (tests call it in-process).

    Typer handles usage errors (exit 2, with the usage line); our own errors become one line on
    stderr with the exit code of their kind, never a traceback.
    """
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command.main(args=args, prog_name="pe-agent", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return EXIT_OK
        return code if isinstance(code, int) else _fail(str(code), EXIT_FAILURE)
    except (ConfigError, UsageError, SchemaOutOfDateError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except AgentError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), EXIT_FAILURE)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
