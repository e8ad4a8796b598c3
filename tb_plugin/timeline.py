"""The MoE tab's "Timeline" view: a run's trace in the catapult trace viewer, offline.

torch-tb-profiler (extra `tbprofiler`) ships catapult's `trace_viewer_full.html`; its own Trace view
loads the webcomponents 0.7.24 polyfill from a CDN and cannot open without the internet. moe-trace
ships that polyfill (static/vendor/webcomponents.min.js, BSD-3-Clause, LICENSE next to it) and serves
everything the viewer needs from its own routes (under `/data/plugin/moe_trace`):

  /timeline?run=NAME          the viewer page (static/timeline.html)
  /timeline_info              {"available": bool, "reason"}: whether trace_viewer_full.html is found
  /trace_viewer_full.html     catapult's viewer, from the installed torch-tb-profiler
  /webcomponents.min.js       the polyfill
  /timeline_trace?run=NAME    {"files": [names]} of the run's trace files;  &file=K: file K, as JSON
  /timeline_link.js           the dashboard's "Timeline" button (an ES module index.js imports)

`MOE_TRACE_TRACE_VIEWER=/path/trace_viewer_full.html` points at another copy of the viewer. Run names
and files go through the plugin's RunStore (only trace files of listed runs inside the log dir).
"""
from __future__ import annotations

import gzip
import importlib.util
import os

from tensorboard.backend import http_util
from werkzeug import wrappers

from .data import RunNameError, UnknownRunError, dumps

VIEWER_ENV = "MOE_TRACE_TRACE_VIEWER"
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_TRACE_BYTES = 1 << 30  # the viewer holds the whole trace in the browser: refuse above 1 GiB


def viewer_path() -> str | None:
    """Path of catapult's trace_viewer_full.html (torch-tb-profiler's copy, or $MOE_TRACE_TRACE_VIEWER)."""
    env = os.environ.get(VIEWER_ENV)
    if env:
        return env if os.path.isfile(env) else None
    spec = importlib.util.find_spec("torch_tb_profiler")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = os.path.join(d, "static", "trace_viewer_full.html")
        if os.path.isfile(p):
            return p
    return None


def routes(plugin) -> dict:
    """The timeline's WSGI apps, keyed by route, for `MoeTracePlugin.get_plugin_apps`."""
    from .plugin import _Asset

    page = _Asset(os.path.join(_STATIC, "timeline.html"), "text/html")
    link = _Asset(os.path.join(_STATIC, "timeline_link.js"), "application/javascript")
    polyfill = _Asset(os.path.join(_STATIC, "vendor", "webcomponents.min.js"), "application/javascript")
    viewer = {"asset": None}

    def asset(a: "_Asset"):
        @wrappers.Request.application
        def serve(request):
            raw, gz = a.get()
            if a.mimetype == "text/html":
                return _html(plugin, request, raw, gz)
            return plugin._respond_bytes(request, raw, gz, a.mimetype, expires=3600)
        return serve

    @wrappers.Request.application
    def serve_info(request):
        p = viewer_path()
        reason = None if p else ("torch-tb-profiler is not installed (pip install moe-trace[tbprofiler])"
                                 if not os.environ.get(VIEWER_ENV) else f"{VIEWER_ENV} is not a file")
        return http_util.Respond(request, dumps({"available": p is not None, "reason": reason}), "application/json")

    @wrappers.Request.application
    def serve_viewer(request):
        p = viewer_path()
        if p is None:
            return http_util.Respond(request, "trace_viewer_full.html not found: install torch-tb-profiler",
                                     "text/plain", code=404)
        if viewer["asset"] is None or viewer["asset"].path != p:
            viewer["asset"] = _Asset(p, "text/html")
        raw, gz = viewer["asset"].get()
        return _html(plugin, request, raw, gz)

    @wrappers.Request.application
    def serve_trace(request):
        try:
            files = run_trace_files(plugin.store, request.args.get("run"))
        except RunNameError as exc:
            return _error(request, f"bad run name: {exc}", 400)
        except UnknownRunError:
            return _error(request, "no such run", 404)
        k = request.args.get("file")
        if k is None:
            return http_util.Respond(request, dumps({"files": [os.path.basename(f) for f in files]}),
                                     "application/json")
        if not k.isdigit() or int(k) >= len(files):
            return _error(request, "no such file of this run", 404)
        path = files[int(k)]
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_TRACE_BYTES + 1)
            if data[:2] == b"\x1f\x8b":
                gz = data
                if len(gz) > MAX_TRACE_BYTES:
                    return _error(request, "trace too large for the browser viewer (use Perfetto)", 413)
                if plugin._gz_ok(request):
                    return http_util.Respond(request, gz, "application/json", content_encoding="gzip")
                data = gzip.decompress(gz)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            return _error(request, f"cannot read the trace file: {type(exc).__name__}", 422)
        if len(data) > MAX_TRACE_BYTES:
            return _error(request, "trace too large for the browser viewer (use Perfetto)", 413)
        return http_util.Respond(request, data, "application/json")

    return {"/timeline": asset(page), "/timeline_link.js": asset(link), "/webcomponents.min.js": asset(polyfill),
            "/timeline_info": serve_info, "/trace_viewer_full.html": serve_viewer, "/timeline_trace": serve_trace}


def run_trace_files(store, name) -> list[str]:
    """Paths of the trace files of run `name` (checked by the store: listed, inside the log dir)."""
    run = store._get_run(name)
    return [e.path for e in store._trace_files(run.path, run.files)]


def _html(plugin, request, raw: bytes, gz: bytes):
    """HTML without TensorBoard's Content-Security-Policy: catapult's viewer is made of inline scripts
    (torch-tb-profiler serves it the same way). Only files shipped in packages are served like this."""
    headers = [("X-Content-Type-Options", "nosniff"), ("Cache-Control", "private, max-age=3600")]
    if plugin._gz_ok(request):
        headers.append(("Content-Encoding", "gzip"))
        return wrappers.Response(gz, content_type="text/html; charset=utf-8", headers=headers)
    return wrappers.Response(raw, content_type="text/html; charset=utf-8", headers=headers)


def _error(request, msg: str, code: int):
    return http_util.Respond(request, dumps({"error": msg}), "application/json", code=code)
