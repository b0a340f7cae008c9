"""The dashboard as a Starlette app: pages (Jinja2, no script, no assets from elsewhere), JSON API, actions.

Pages: /worklist (by flag, filters, auto-refresh), /studies/{uid} (result, input quality, Grad-CAM,
SR summary, deliveries, events), /queue (jobs, workers, deliveries), /health (parts, time to
notification). JSON: /api/... (docs/API.md); /worklist also answers JSON to clients that do not
ask for HTML. /healthz and /metrics as before. Admin actions: POST forms under /actions/ (signed-in
session + CSRF token) and POST /api/... (bearer token, or session + X-CSRF-Token header).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs_agent.db.models import DeliveryStatus, Flag, JobStatus, Output, OutputKind, Series
from pacs_agent.db.migrate import head_revision
from pacs_agent.logs import get_logger
from pacs_agent.metrics import Stage, build_registry, stage_histograms, study_timelines
from pacs_agent.node.web import actions, resources
from pacs_agent.node.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_CSRF,
    SESSION_USER,
    AdminCredentials,
    bearer_token,
    csrf_matches,
    new_csrf_token,
)
from pacs_agent.node.web.dicom_views import DicomViewError, secondary_capture_png, structured_report_summary
from pacs_agent.node.web.server import HealthProbes, health
from pacs_agent.notify.ack import notification_for_link
from pacs_agent.notify.links import load_signing_key
from pacs_agent.errors import NotificationError
from pacs_agent.settings import Settings

log = get_logger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SESSION_COOKIE = "pe_agent_session"
SESSION_MAX_AGE = 12 * 3600
#: Pages and JSON carry results and, if configured, patient identifiers: never cached, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
FLAG_ORDER = (Flag.CRITICAL, Flag.HIGH, Flag.ERROR, Flag.REVIEW, Flag.ROUTINE)
#: Failed sign-ins wait this long before the answer (slows guessing; argon2 already costs ~50 ms).
LOGIN_FAILURE_DELAY_S = 1.0


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------- template helpers


def _parse_time(value: str | datetime | None) -> datetime | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def fmt_time(value: str | datetime | None) -> str:
    at = _parse_time(value)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else ""


def fmt_ago(value: str | datetime | None) -> str:
    at = _parse_time(value)
    if at is None:
        return ""
    seconds = max((datetime.now(at.tzinfo) - at).total_seconds(), 0)
    if seconds < 90:
        return f"{int(seconds)} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def fmt_seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def fmt_probability(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def short_uid(uid: str, keep: int = 14) -> str:
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _safe_next(value: str | None, default: str) -> str:
    """Only same-site paths: "/x", never "//host" or "http://host"."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/html" not in accept


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _flags(values: list[str]) -> tuple[Flag, ...]:
    flags = []
    for raw in values:
        for part in raw.split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name not in Flag.__members__:
                raise HTTPException(400, f"unknown flag {part.strip()!r}; flags are {', '.join(f.value for f in FLAG_ORDER)}")
            flags.append(Flag(name))
    return tuple(dict.fromkeys(flags))


def _statuses(values: list[str], enum: type[JobStatus] | type[DeliveryStatus]) -> list[Any]:
    out = []
    for raw in values:
        for part in raw.split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name not in enum.__members__:
                raise HTTPException(400, f"unknown status {part.strip()!r}; one of {', '.join(enum.__members__)}")
            out.append(enum(name))
    return out


def _int_param(request: Request, name: str, default: int, *, low: int = 1, high: int = 1000) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise HTTPException(400, f"{name} must be between {low} and {high}")
    return value


class Dashboard:
    """The app's state (settings, database, credentials) and its endpoints."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], probes: HealthProbes) -> None:
        self.settings = settings
        self.factory = session_factory
        self.probes = probes
        self.credentials = AdminCredentials.from_files(settings.http.admin_password_file, settings.http.admin_token_file)
        self.identifiers = resources.IdentifierPolicy(show=settings.http.show_patient_identifiers, spool_root=Path(settings.storage.root))
        self.registry = build_registry(session_factory)
        #: Signs and checks the acknowledgement links of alert messages (None: such links are not issued).
        self.signing_key = load_signing_key(settings.alerts.signing_key_file) if settings.alerts.signing_key_file else None
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
        env.filters.update(time=fmt_time, ago=fmt_ago, seconds=fmt_seconds, probability=fmt_probability, short_uid=short_uid,
                           urlquote=lambda v: quote(str(v), safe=""), tojson_pretty=lambda v: json.dumps(v, indent=1, default=str))
        self.templates = Jinja2Templates(env=env)

    # -- session, user, CSRF ----------------------------------------------------------------
    def _csrf(self, request: Request) -> str:
        token = request.session.get(SESSION_CSRF)
        if not token:
            token = new_csrf_token()
            request.session[SESSION_CSRF] = token
        return str(token)

    def _session_user(self, request: Request) -> str | None:
        user = request.session.get(SESSION_USER)
        return str(user) if user and user in self.credentials.password_hashes else None

    def page(self, request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        flash = request.session.pop("flash", None)
        base = {
            "user": self._session_user(request),
            "csrf_token": self._csrf(request),
            "csrf_field": CSRF_FIELD,
            "flash": flash,
            "refresh_seconds": 0,
            "show_identifiers": self.settings.http.show_patient_identifiers,
            "login_enabled": self.credentials.passwords_enabled,
            "actions_enabled": self.credentials.configured,
            "node_ae_title": self.settings.node.ae_title,
            "flags": [f.value for f in FLAG_ORDER],
            "path": request.url.path,
            "now": datetime.now().astimezone(),
        }
        return self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)

    def refused_page(self, request: Request, message: str, status_code: int) -> Response:
        return self.page(request, "message.html", {"title": "Refused", "message": message, "refused": True}, status_code)

    # -- pages -------------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return RedirectResponse("/worklist", status_code=303)

    async def worklist(self, request: Request) -> Response:
        flags = _flags(request.query_params.getlist("flag"))
        unacknowledged = request.query_params.get("unacknowledged", "") in ("1", "true", "yes", "on")
        limit = _int_param(request, "limit", 500, high=5000)

        def load(session: Session) -> tuple[list[dict[str, Any]], dict[str, int]]:
            entries = resources.worklist(session, self.identifiers, flags=flags, unacknowledged_only=unacknowledged, limit=limit)
            return entries, resources.worklist_counts(session)

        entries, counts = await self._read(load)
        if _wants_json(request):
            return JSONResponse(entries)
        return self.page(request, "worklist.html", {
            "title": "Worklist", "entries": entries, "counts": counts, "selected": [f.value for f in flags],
            "unacknowledged": unacknowledged, "refresh_seconds": self.settings.http.refresh_seconds,
            "total": sum(counts.values()),
        })

    async def study(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        detail = await self._read(lambda s: resources.study_detail(s, self.identifiers, uid))
        if detail is None:
            raise HTTPException(404, f"study {uid} is not known to this node")
        reports = await run_in_threadpool(self._reports, detail)
        return self.page(request, "study.html", {"title": "Study", "detail": detail, "reports": reports, "uid": uid})

    def _reports(self, detail: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Per job id: the SR summary (or why not) and the SC previews, read from the outbox."""
        out: dict[int, dict[str, Any]] = {}
        root = Path(self.settings.storage.root).resolve()
        for series in detail["series"]:
            for job in series["jobs"]:
                sr: dict[str, Any] | None = None
                for output in job["outputs"]:
                    if output["kind"] != OutputKind.SR.value:
                        continue
                    path = (root / output["path"]).resolve()
                    try:
                        if not path.is_relative_to(root):
                            raise DicomViewError("the SR path leaves the spool")
                        summary = structured_report_summary(path)
                        sr = {"ok": True, "summary": summary}
                    except DicomViewError as exc:
                        sr = {"ok": False, "error": str(exc)}
                out[job["id"]] = {"sr": sr, "images": [o for o in job["outputs"] if o["kind"] == OutputKind.SC.value]}
        return out

    async def series(self, request: Request) -> Response:
        uid = request.path_params["uid"]

        def find(session: Session) -> tuple[str, int] | None:
            row = session.execute(select(Series.study_instance_uid, Series.id).where(Series.series_instance_uid == uid)).first()
            return (str(row[0]), int(row[1])) if row else None

        found = await self._read(find)
        if found is None:
            raise HTTPException(404, f"series {uid} is not known to this node")
        return RedirectResponse(f"/studies/{quote(found[0], safe='')}#series-{found[1]}", status_code=303)

    async def queue(self, request: Request) -> Response:
        overview = await self._read(lambda s: resources.queue_overview(s, heartbeat_seconds=self.settings.workers.heartbeat_seconds))
        return self.page(request, "queue.html", {"title": "Queue", "q": overview, "refresh_seconds": self.settings.http.refresh_seconds})

    async def health_page(self, request: Request) -> Response:
        ok, details = await run_in_threadpool(health, self.factory, self.probes)
        timing = await self._read(self._timing)
        disk = await run_in_threadpool(self._disk)
        return self.page(request, "health.html", {
            "title": "Health", "ok": ok, "details": details, "timing": timing, "disk": disk, "schema_revision": head_revision(),
            "refresh_seconds": self.settings.http.refresh_seconds,
        }, status_code=200)

    def _disk(self) -> dict[str, Any]:
        import shutil

        root = Path(self.settings.storage.root)
        try:
            usage = shutil.disk_usage(root)
        except OSError as exc:
            return {"ok": False, "error": exc.strerror or str(exc)}
        minimum = self.settings.node.min_free_disk_mb * 1024 * 1024
        return {"ok": usage.free >= minimum, "free_mb": usage.free // (1024 * 1024), "total_mb": usage.total // (1024 * 1024),
                "min_free_mb": self.settings.node.min_free_disk_mb}

    def _timing(self, session: Session) -> dict[str, Any]:
        histograms = stage_histograms(study_timelines(session))
        rows = []
        for flag in FLAG_ORDER:
            cells = []
            for stage in Stage:
                h = next(x for x in histograms if x.stage == stage and x.flag == flag)
                cells.append({"stage": stage.value, "count": h.count, "median": h.median_seconds, "p90": h.p90_seconds,
                              "max": h.max_seconds, "buckets": [(b, c) for b, c in h.buckets]})
            rows.append({"flag": flag.value, "cells": cells})
        return {"stages": [s.value for s in Stage], "rows": rows}

    async def time_to_notification_api(self, request: Request) -> Response:
        def load(session: Session) -> list[dict[str, Any]]:
            return [
                {"stage": h.stage.value, "flag": h.flag.value, "count": h.count, "sum_seconds": round(h.sum_seconds, 3),
                 "median_seconds": h.median_seconds, "p90_seconds": h.p90_seconds, "max_seconds": h.max_seconds,
                 "buckets": [{"le": "+Inf" if math.isinf(b) else b, "count": c} for b, c in h.buckets]}
                for h in stage_histograms(study_timelines(session))
            ]
        return JSONResponse(await self._read(load))

    async def output_image(self, request: Request) -> Response:
        output_id = int(request.path_params["output_id"])

        def load(session: Session) -> Output | None:
            return session.get(Output, output_id)

        output = await self._read(load)
        if output is None or output.kind != OutputKind.SC:
            raise HTTPException(404, f"no Grad-CAM image with id {output_id}")
        root = Path(self.settings.storage.root).resolve()
        path = (root / output.path).resolve()
        if not path.is_relative_to(root):
            raise HTTPException(404, "the image path leaves the spool")
        try:
            png = await run_in_threadpool(secondary_capture_png, path)
        except DicomViewError as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # -- login ---------------------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        if not self.credentials.passwords_enabled:
            return self.page(request, "message.html", {
                "title": "Sign-in not configured",
                "message": "No admin password file is configured (http.admin_password_file); the dashboard is read-only here.",
                "refused": False,
            }, 404)
        return self.page(request, "login.html", {"title": "Sign in", "next": _safe_next(request.query_params.get("next"), "/worklist"),
                                                 "error": None})

    async def login(self, request: Request) -> Response:
        form = await request.form()
        next_url = _safe_next(str(form.get("next", "")), "/worklist")
        if not csrf_matches(request.session.get(SESSION_CSRF), _str(form, CSRF_FIELD)):
            return self.refused_page(request, "The form expired or did not come from this dashboard (CSRF check). Reload and try again.", 403)
        user, password = _str(form, "username").strip(), _str(form, "password")
        ok = await run_in_threadpool(self.credentials.check_password, user, password)
        if not ok:
            log.warning("dashboard_login_failed", user=user[:64], client=_client(request))
            await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
            return self.page(request, "login.html", {"title": "Sign in", "next": next_url, "error": "Wrong user name or password."}, 401)
        request.session.clear()
        request.session[SESSION_USER] = user
        request.session[SESSION_CSRF] = new_csrf_token()
        request.session["flash"] = f"Signed in as {user}."
        log.info("dashboard_login", user=user, client=_client(request))
        return RedirectResponse(next_url, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_matches(request.session.get(SESSION_CSRF), _str(form, CSRF_FIELD)):
            return self.refused_page(request, "The form expired or did not come from this dashboard (CSRF check).", 403)
        request.session.clear()
        request.session["flash"] = "Signed out."
        return RedirectResponse("/worklist", status_code=303)

    # -- actions -------------------------------------------------------------------------------
    def _api_actor(self, request: Request) -> actions.Actor | JSONResponse:
        """The user of an API call (bearer token; or session + X-CSRF-Token), or the refusal to send."""
        if not self.credentials.configured:
            return JSONResponse({"error": "admin actions are disabled: configure http.admin_password_file or http.admin_token_file"}, 403)
        token = bearer_token(request.headers.get("authorization"))
        if token is not None:
            user = self.credentials.user_for_token(token)
            if user is None:
                log.warning("dashboard_token_refused", client=_client(request), path=request.url.path)
                return JSONResponse({"error": "unknown token"}, 401, headers={"WWW-Authenticate": "Bearer"})
            return actions.Actor(user=user, via="api", client=_client(request))
        user = self._session_user(request)
        if user is None:
            return JSONResponse({"error": "authentication required (Authorization: Bearer TOKEN)"}, 401, headers={"WWW-Authenticate": "Bearer"})
        if not csrf_matches(request.session.get(SESSION_CSRF), request.headers.get(CSRF_HEADER)):
            return JSONResponse({"error": f"CSRF check failed: send the session's token in {CSRF_HEADER}"}, 403)
        return actions.Actor(user=user, via="web", client=_client(request))

    async def _form_actor(self, request: Request, what: str) -> tuple[actions.Actor | Response, FormData]:
        form = await request.form()
        if not self.credentials.configured:
            return self.refused_page(request, f"Refused: {what} needs an administrator, and admin sign-in is not configured on this node "
                                     "(http.admin_password_file or http.admin_token_file).", 403), form
        if not csrf_matches(request.session.get(SESSION_CSRF), _str(form, CSRF_FIELD)):
            log.warning("dashboard_csrf_refused", client=_client(request), path=request.url.path)
            return self.refused_page(request, "Refused: the form expired or did not come from this dashboard (CSRF check). "
                                     "Reload the page and try again.", 403), form
        user = self._session_user(request)
        if user is None:
            log.warning("dashboard_action_unauthenticated", client=_client(request), path=request.url.path)
            return self.refused_page(request, f"Refused: sign in as an administrator to {what}.", 401), form
        return actions.Actor(user=user, via="web", client=_client(request)), form

    async def _run_form_action(self, request: Request, what: str, run: Callable[[actions.Actor, FormData], actions.ActionOutcome],
                               default_next: str) -> Response:
        actor, form = await self._form_actor(request, what)
        if isinstance(actor, Response):
            return actor
        next_url = _safe_next(_str(form, "next"), default_next)
        try:
            outcome = await run_in_threadpool(run, actor, form)
        except actions.ActionRefused as exc:
            return self.refused_page(request, f"Could not {what}: {exc}", exc.status)
        log.info("dashboard_action", action=what, user=actor.user, **{k: v for k, v in outcome.data.items() if k != "kind"})
        request.session["flash"] = outcome.message[:300]
        return RedirectResponse(next_url, status_code=303)

    async def action_reprocess(self, request: Request) -> Response:
        return await self._run_form_action(
            request, "reprocess",
            lambda actor, form: actions.reprocess(self.factory, actor, _str(form, "series_instance_uid"),
                                                  max_attempts=self.settings.workers.max_attempts),
            "/worklist",
        )

    async def action_retry(self, request: Request) -> Response:
        return await self._run_form_action(
            request, "retry the delivery", lambda actor, form: actions.retry(self.factory, actor, _form_int(form, "delivery_id")), "/queue",
        )

    async def action_cancel(self, request: Request) -> Response:
        return await self._run_form_action(
            request, "cancel the job", lambda actor, form: actions.cancel(self.factory, actor, _form_int(form, "job_id")), "/queue",
        )

    async def action_acknowledge(self, request: Request) -> Response:
        return await self._run_form_action(
            request, "acknowledge the result",
            lambda actor, form: actions.acknowledge(self.factory, actor, _str(form, "study_instance_uid"), note=_str(form, "note")),
            "/worklist",
        )

    async def _run_api_action(self, request: Request, run: Callable[[actions.Actor, dict[str, Any]], actions.ActionOutcome]) -> Response:
        actor = self._api_actor(request)
        if isinstance(actor, Response):
            return actor
        body: dict[str, Any] = {}
        raw = await request.body()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError:
                return JSONResponse({"error": "the body must be a JSON object"}, 400)
            if not isinstance(parsed, dict):
                return JSONResponse({"error": "the body must be a JSON object"}, 400)
            body = parsed
        try:
            outcome = await run_in_threadpool(run, actor, body)
        except actions.ActionRefused as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        log.info("api_action", path=request.url.path, user=actor.user)
        return JSONResponse({"ok": True, "message": outcome.message, **outcome.data})

    async def api_reprocess(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        return await self._run_api_action(
            request, lambda actor, body: actions.reprocess(self.factory, actor, uid, max_attempts=self.settings.workers.max_attempts))

    async def api_retry(self, request: Request) -> Response:
        delivery_id = int(request.path_params["delivery_id"])
        return await self._run_api_action(request, lambda actor, body: actions.retry(self.factory, actor, delivery_id))

    async def api_cancel(self, request: Request) -> Response:
        job_id = int(request.path_params["job_id"])
        return await self._run_api_action(request, lambda actor, body: actions.cancel(self.factory, actor, job_id))

    async def api_acknowledge(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        return await self._run_api_action(
            request, lambda actor, body: actions.acknowledge(self.factory, actor, uid, note=str(body.get("note", ""))))

    # -- signed acknowledgement links (alert messages) ------------------------------------------
    async def ack_link_page(self, request: Request) -> Response:
        """What the link acknowledges, and a button: opening a link (a mail scanner does) changes nothing."""
        token = request.path_params["token"]
        if self.signing_key is None:
            return self.refused_page(request, "Acknowledgement links are not configured on this node (alerts.signing_key_file).", 404)
        key = self.signing_key

        def load(session: Session) -> dict[str, Any]:
            n = notification_for_link(session, key, token)
            return {"notification_id": n.id, "study_instance_uid": n.study_instance_uid, "flag": n.flag.value, "target": n.target,
                    "acknowledged": None if n.acknowledged_at is None else {"by": n.acknowledged_by, "at": n.acknowledged_at.isoformat()},
                    "study": resources.study_detail(session, self.identifiers, n.study_instance_uid)}

        try:
            alert = await self._read(load)
        except NotificationError as exc:
            return self.refused_page(request, str(exc), 403)
        return self.page(request, "ack_link.html", {"title": "Acknowledge", "alert": alert, "token": token})

    async def ack_link(self, request: Request) -> Response:
        token = request.path_params["token"]
        if self.signing_key is None:
            return self.refused_page(request, "Acknowledgement links are not configured on this node (alerts.signing_key_file).", 404)
        form = await request.form()
        if not csrf_matches(request.session.get(SESSION_CSRF), _str(form, CSRF_FIELD)):
            return self.refused_page(request, "The form expired or did not come from this dashboard (CSRF check). Open the link again.", 403)
        key = self.signing_key
        try:
            outcome = await run_in_threadpool(
                lambda: actions.acknowledge_by_link(self.factory, key, token, user=_str(form, "user").strip()[:128],
                                                    note=_str(form, "note"), client=_client(request)))
        except actions.ActionRefused as exc:
            return self.refused_page(request, str(exc), exc.status)
        log.info("dashboard_link_acknowledged", study_instance_uid=outcome.data["study_instance_uid"], user=outcome.data["acknowledged_by"])
        request.session["flash"] = outcome.message[:300]
        return RedirectResponse(f"/studies/{quote(outcome.data['study_instance_uid'], safe='')}", status_code=303)

    # -- JSON reads ----------------------------------------------------------------------------
    async def _read(self, load: Callable[[Session], Any]) -> Any:
        def run() -> Any:
            with self.factory() as session:
                return load(session)
        return await run_in_threadpool(run)

    async def api_worklist(self, request: Request) -> Response:
        flags = _flags(request.query_params.getlist("flag"))
        unacknowledged = request.query_params.get("unacknowledged", "") in ("1", "true", "yes", "on")
        limit = _int_param(request, "limit", 500, high=5000)
        return JSONResponse(await self._read(
            lambda s: resources.worklist(s, self.identifiers, flags=flags, unacknowledged_only=unacknowledged, limit=limit)))

    async def api_study(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        detail = await self._read(lambda s: resources.study_detail(s, self.identifiers, uid))
        if detail is None:
            return JSONResponse({"error": f"study {uid} is not known to this node"}, 404)
        return JSONResponse(detail)

    async def api_series(self, request: Request) -> Response:
        uid = request.path_params["uid"]

        def load(session: Session) -> dict[str, Any] | None:
            row = session.scalars(select(Series).where(Series.series_instance_uid == uid)).first()
            return resources.series_detail(session, row, self.identifiers) if row is not None else None

        detail = await self._read(load)
        if detail is None:
            return JSONResponse({"error": f"series {uid} is not known to this node"}, 404)
        return JSONResponse(detail)

    async def api_jobs(self, request: Request) -> Response:
        statuses = _statuses(request.query_params.getlist("status"), JobStatus)
        limit = _int_param(request, "limit", 100)
        return JSONResponse(await self._read(lambda s: resources.jobs(s, statuses=statuses, limit=limit)))

    async def api_job(self, request: Request) -> Response:
        from pacs_agent.db.models import Job

        job_id = int(request.path_params["job_id"])

        def load(session: Session) -> dict[str, Any] | None:
            job = session.get(Job, job_id)
            return resources.job_detail(job) if job is not None else None

        detail = await self._read(load)
        if detail is None:
            return JSONResponse({"error": f"job {job_id} does not exist"}, 404)
        return JSONResponse(detail)

    async def api_deliveries(self, request: Request) -> Response:
        statuses = _statuses(request.query_params.getlist("status"), DeliveryStatus)
        limit = _int_param(request, "limit", 200)
        return JSONResponse(await self._read(lambda s: resources.deliveries(s, statuses=statuses, limit=limit)))

    async def api_workers(self, request: Request) -> Response:
        return JSONResponse(await self._read(lambda s: resources.workers(s, heartbeat_seconds=self.settings.workers.heartbeat_seconds)))

    async def api_queue(self, request: Request) -> Response:
        return JSONResponse(await self._read(
            lambda s: resources.queue_overview(s, heartbeat_seconds=self.settings.workers.heartbeat_seconds)))

    async def healthz(self, request: Request) -> Response:
        ok, details = await run_in_threadpool(health, self.factory, self.probes)
        return JSONResponse(details, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- errors --------------------------------------------------------------------------------
    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if status == 404 and detail == "Not Found":
            detail = f"no such page {request.url.path}"
        if request.url.path.startswith("/api/") or _wants_json(request):
            return JSONResponse({"error": detail}, status)
        return self.page(request, "message.html", {"title": "Not found" if status == 404 else "Error", "message": detail,
                                                   "refused": False}, status)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.error("http_request_failed", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        if request.url.path.startswith("/api/") or _wants_json(request):
            return JSONResponse({"error": "internal error"}, 500)
        return HTMLResponse("<!doctype html><title>Error</title><p>Internal error; the node's log has the cause.</p>", 500)


def _str(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _form_int(form: FormData, name: str) -> int:
    raw = _str(form, name)
    if not raw.isdigit():
        raise actions.ActionRefused(f"{name} must be a whole number", 400)
    return int(raw)


def create_app(settings: Settings, session_factory: sessionmaker[Session], probes: HealthProbes) -> Starlette:
    """The ASGI app. Raises ConfigError when a credentials file is missing or malformed."""
    d = Dashboard(settings, session_factory, probes)
    routes = [
        Route("/", d.home),
        Route("/worklist", d.worklist),
        Route("/studies/{uid:str}", d.study),
        Route("/series/{uid:str}", d.series),
        Route("/queue", d.queue),
        Route("/health", d.health_page),
        Route("/outputs/{output_id:int}/image.png", d.output_image),
        Route("/login", d.login_form, methods=["GET"]),
        Route("/login", d.login, methods=["POST"]),
        Route("/logout", d.logout, methods=["POST"]),
        Route("/actions/reprocess", d.action_reprocess, methods=["POST"]),
        Route("/actions/retry", d.action_retry, methods=["POST"]),
        Route("/actions/cancel", d.action_cancel, methods=["POST"]),
        Route("/actions/acknowledge", d.action_acknowledge, methods=["POST"]),
        Route("/ack/{token:str}", d.ack_link_page, methods=["GET"]),
        Route("/ack/{token:str}", d.ack_link, methods=["POST"]),
        Route("/api/worklist", d.api_worklist),
        Route("/api/studies/{uid:str}", d.api_study),
        Route("/api/studies/{uid:str}/acknowledge", d.api_acknowledge, methods=["POST"]),
        Route("/api/series/{uid:str}", d.api_series),
        Route("/api/series/{uid:str}/reprocess", d.api_reprocess, methods=["POST"]),
        Route("/api/jobs", d.api_jobs),
        Route("/api/jobs/{job_id:int}", d.api_job),
        Route("/api/jobs/{job_id:int}/cancel", d.api_cancel, methods=["POST"]),
        Route("/api/deliveries", d.api_deliveries),
        Route("/api/deliveries/{delivery_id:int}/retry", d.api_retry, methods=["POST"]),
        Route("/api/workers", d.api_workers),
        Route("/api/queue", d.api_queue),
        Route("/api/time-to-notification", d.time_to_notification_api),
        Route("/api/health", d.healthz),
        Route("/healthz", d.healthz),
        Route("/metrics", d.metrics),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE,
                   same_site="strict", https_only=bool(settings.http.tls_certificate)),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: d.http_error, Exception: d.server_error,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)  # type: ignore[arg-type]
