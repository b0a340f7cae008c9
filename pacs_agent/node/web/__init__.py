"""The web dashboard of `pe-agent serve`: worklist, studies, queue, health, JSON API, /healthz, /metrics.

An ASGI app (Starlette, Jinja2 templates, no asset from elsewhere) run by uvicorn in the serve
process: app.py (routes), resources.py (the JSON shapes), actions.py (admin actions, audited),
auth.py (users, sessions, CSRF), dicom_views.py (PNG from SC, SR summary), server.py (uvicorn).
"""

from __future__ import annotations

from pacs_agent.node.web.server import HealthProbes, WebServer, health

__all__ = ["HealthProbes", "WebServer", "health"]
