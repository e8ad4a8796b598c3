"""`MoeTracePlugin`: the "MoE" tab of TensorBoard (registered via the `tensorboard_plugins` entry point).

Routes (under `/data/plugin/moe_trace`):

  /index.js, /style.css   the frontend (an ES module loaded by TensorBoard in an iframe)
  /plotly.min.js          plotly.js from the installed `plotly` Python package (no CDN)
  /runs                   {"runs": [{"name", "files", "bytes", "mtime", "status", ...}]}
  /report?run=NAME        {"run", "report": Report.to_dict()} or {"run", "error"} (HTTP 422)
  /trace?run=NAME&file=F  one of the run's trace files, as a download (open it in ui.perfetto.dev)
  /timeline?run=NAME ...  the run's trace in catapult's trace viewer, offline (timeline.py)

A bad run name gives 400, an unknown one 404.
"""
from __future__ import annotations

import gzip
import os
import threading

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from . import timeline
from .data import RunNameError, RunStore, UnknownRunError, dumps, trace_download

PLUGIN_NAME = "moe_trace"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_FILES = {
    "/index.js": ("index.js", "application/javascript"),
    "/style.css": ("style.css", "text/css"),
}
_ASSET_CACHE_S = 3600


def plotly_js_path() -> str:
    """Path of plotly.min.js shipped inside the installed `plotly` Python package."""
    import plotly

    path = os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return path


class _Asset:
    """A static file kept in memory, raw and gzipped (compressed once, not per request)."""

    def __init__(self, path: str, mimetype: str):
        self.path, self.mimetype = path, mimetype
        self._lock = threading.Lock()
        self._key = None
        self._raw = self._gz = b""

    def get(self) -> tuple[bytes, bytes]:
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size)
        if key != self._key:
            with self._lock:
                if key != self._key:
                    with open(self.path, "rb") as f:
                        raw = f.read()
                    self._raw, self._gz = raw, gzip.compress(raw, compresslevel=6, mtime=0)
                    self._key = key
        return self._raw, self._gz


class MoeTracePlugin(base_plugin.TBPlugin):
    """MoE dashboard over the Kineto traces that `moe_trace.profile(mode="kineto")` writes."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context):
        self._store = RunStore(getattr(context, "logdir", None))
        self._assets = {route: _Asset(os.path.join(_STATIC, fname), mt)
                        for route, (fname, mt) in _STATIC_FILES.items()}
        self._plotly: _Asset | None = None
        self._warmed = False
        self._warm_lock = threading.Lock()
        # start loading at TensorBoard start-up when the log dir has traces: reading them (and the
        # first `import moe_trace`, which imports torch) is then done before the tab is opened
        threading.Thread(target=self.is_active, name="moe_trace-scan", daemon=True).start()

    @property
    def store(self) -> RunStore:
        return self._store

    # TBPlugin API -----------------------------------------------------------------------------
    def get_plugin_apps(self):
        apps = {route: self._serve_asset for route in self._assets}
        apps["/plotly.min.js"] = self._serve_plotly
        apps["/runs"] = self._serve_runs
        apps["/report"] = self._serve_report
        apps["/trace"] = self._serve_trace
        apps.update(timeline.routes(self))  # the "Timeline" view (timeline.py)
        return apps

    def is_active(self):
        """Cheap: whether any `*.pt.trace.json[.gz]` is under the log dir (a cached directory walk).

        The first time it is true, a background thread starts loading the newest runs and compressing
        plotly.js, so the dashboard finds them ready."""
        try:
            active = self._store.has_runs()
        except Exception:
            return False
        if active and not self._warmed:
            with self._warm_lock:
                if self._warmed:
                    return active
                self._warmed = True
            self._warm_up()
        return active

    def _warm_up(self):
        def assets():
            try:
                if self._plotly is None:
                    self._plotly = _Asset(plotly_js_path(), "application/javascript")
                self._plotly.get()
                for a in self._assets.values():
                    a.get()
            except Exception:
                pass

        threading.Thread(target=assets, name="moe_trace-assets", daemon=True).start()
        self._store.warm_up()

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="MoE")

    # handlers -----------------------------------------------------------------------------------
    @staticmethod
    def _gz_ok(request) -> bool:
        return "gzip" in request.headers.get("Accept-Encoding", "").lower()

    def _respond_bytes(self, request, raw: bytes, gz: bytes, mimetype: str, code=200, expires=0):
        if self._gz_ok(request):
            return http_util.Respond(request, gz, mimetype, code=code, content_encoding="gzip", expires=expires)
        return http_util.Respond(request, raw, mimetype, code=code, expires=expires)

    @wrappers.Request.application
    def _serve_asset(self, request):
        asset = self._assets[request.path[request.path.rfind("/"):]]
        raw, gz = asset.get()
        return self._respond_bytes(request, raw, gz, asset.mimetype)

    @wrappers.Request.application
    def _serve_plotly(self, request):
        try:
            if self._plotly is None:
                self._plotly = _Asset(plotly_js_path(), "application/javascript")
            raw, gz = self._plotly.get()
        except (ImportError, OSError):
            msg = "console.error('moe_trace: the plotly Python package is not installed " \
                  "(pip install moe-trace[tensorboard])');"
            return http_util.Respond(request, msg, "application/javascript", code=404)
        return self._respond_bytes(request, raw, gz, "application/javascript", expires=_ASSET_CACHE_S)

    @wrappers.Request.application
    def _serve_runs(self, request):
        runs = self._store.list_runs(include_plain=True)
        body = {"runs": [r for r in runs if r["kind"] != "plain"],
                "plain_runs": [r["name"] for r in runs if r["kind"] == "plain"],
                "logdir_set": bool(self._store.logdir)}
        return http_util.Respond(request, dumps(body), "application/json")

    @wrappers.Request.application
    def _serve_report(self, request):
        name = request.args.get("run")
        try:
            entry = self._store.get(name)
        except RunNameError as exc:
            return http_util.Respond(request, dumps({"run": None, "error": f"bad run name: {exc}"}),
                                     "application/json", code=400)
        except UnknownRunError:
            return http_util.Respond(request, dumps({"run": None, "error": "no such run"}),
                                     "application/json", code=404)
        code = 422 if entry.error else 200
        return self._respond_bytes(request, entry.body, entry.body_gz, "application/json", code=code)

    @wrappers.Request.application
    def _serve_trace(self, request):
        """A run's trace file as an attachment (only files the run lists; see data.trace_download)."""
        try:
            path, fname = trace_download(self._store, request.args.get("run"), request.args.get("file"))
        except RunNameError as exc:
            return http_util.Respond(request, dumps({"error": f"bad request: {exc}"}), "application/json", code=400)
        except UnknownRunError:
            return http_util.Respond(request, dumps({"error": "no such run or trace file"}), "application/json",
                                     code=404)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return http_util.Respond(request, dumps({"error": "the trace file cannot be read"}), "application/json",
                                     code=404)
        resp = wrappers.Response(raw, mimetype="application/octet-stream")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in fname)
        resp.headers["Content-Disposition"] = f'attachment; filename="{safe}"'
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp
