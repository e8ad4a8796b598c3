"""Time-to-painted of the moe-trace TensorBoard dashboard in headless Chromium.

Builds a synthetic run (default 48 MoE layers x 128 experts, top-8, 1 prefill + 64 decode steps,
timed on two devices), writes it with `moe_trace.trace.write_trace` under a temporary log dir, starts
`tensorboard --logdir` on 127.0.0.1 and loads the plugin's page (`/data/plugin_entry.html?name=
moe_trace`, exactly what TensorBoard's MoE tab puts in its iframe) in headless Chromium, driven over
the DevTools protocol on a pipe (no extra Python packages).

"Painted" is when the page sets `data-painted="1"` on <body>: every chart drawn and the frame after
it painted. Times are the page's own `performance.now()`, i.e. ms since navigation start, so
Chromium's start-up is not counted. Each load uses a fresh browser context (empty HTTP cache) unless
said otherwise; DevTools' Runtime/Network domains stay off while timing (they slow V8 down).

    python benchmarks/tb_dashboard_bench.py                     # 48 x 128, 7 loads
    python benchmarks/tb_dashboard_bench.py --compare --tb-ui   # + two runs compared, + whole TensorBoard page
    python benchmarks/tb_dashboard_bench.py --compare --screenshots docs/img
    python benchmarks/tb_dashboard_bench.py --layers 8 --experts 16 --repeat 3

Exit status 0 when the heatmap has one row per layer and the median paint time is within --budget-ms.
The helpers (`make_run_data`, `write_run`, `Chromium`, `TensorBoardProcess`, ...) are reused by
tests/test_tb_plugin.py and tests/test_tb_plugin_e2e.py.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moe_trace.analysis import PHASES, LayerCounts, LayerInfo, RunData  # noqa: E402

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


# -- a synthetic run ------------------------------------------------------------------------------

def make_run_data(num_layers: int = 48, num_experts: int = 128, top_k: int = 8, *, seed: int = 0,
                  devices: tuple[str, ...] = ("cuda:0", "cuda:1"), prompt_tokens: int = 2048,
                  decode_steps: int = 64, batch: int = 4, timed: bool = True, skew: float = 0.6,
                  dead_every: int = 7, name: str = "synthetic-moe") -> RunData:
    """A plausible RunData: Zipf-skewed expert loads that vary by layer, a few dead experts, k
    mostly `top_k` (some tokens drop experts), timings that grow with the load. Layers are spread
    over `devices` in contiguous blocks (pipeline style)."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(num_layers):
        dev = devices[min(len(devices) - 1, i * len(devices) // max(1, num_layers))]
        layers.append(LayerInfo(index=i, name=f"model.layers.{i}.mlp", family="synthetic", num_experts=num_experts,
                                top_k=top_k, hidden_size=2048, expert_dim=768, shared_expert_dim=0 if i % 2 else 1024,
                                device=dev))
    tokens = {"prefill": prompt_tokens * batch, "decode": decode_steps * batch, "verify": 0}
    calls = {"prefill": 1, "decode": decode_steps, "verify": 0}
    counts: dict[str, list[LayerCounts]] = {p: [] for p in PHASES}
    timing: dict[str, list[dict]] = {p: [] for p in PHASES}
    for i in range(num_layers):
        # per-layer popularity: Zipf over a layer-specific permutation, some experts never chosen
        pop = 1.0 / np.arange(1, num_experts + 1) ** (skew * (0.6 + 0.8 * i / max(1, num_layers - 1)))
        pop = pop[rng.permutation(num_experts)]
        if dead_every:
            pop[rng.choice(num_experts, size=(i % dead_every), replace=False)] = 0.0
        pop /= pop.sum()
        for p in PHASES:
            t = tokens[p]
            k_hist = np.zeros(top_k + 1, dtype=np.int64)
            dropped = int(t * 0.03 * (i % 3))
            k_hist[top_k] = t - dropped
            if dropped:
                k_hist[top_k - 1] = dropped
            assignments = int((np.arange(top_k + 1) * k_hist).sum())
            ec = rng.multinomial(assignments, pop).astype(np.int64)
            counts[p].append(LayerCounts(tokens=t, calls=calls[p], expert_counts=ec, k_hist=k_hist,
                                         excluded=int(t * top_k - assignments),
                                         top1_prob_sum=float(t * 0.3), entropy_sum=float(t * 2.0)))
            # ms per forward: a fixed launch cost plus a per-token cost; experts slow down with imbalance
            per_tok = t / max(1, calls[p])
            imbalance = float(ec.max() / max(1.0, ec.mean()))
            timing[p].append({
                "router_ms": round(calls[p] * (0.02 + 2e-5 * per_tok) * (1 + 0.1 * rng.random()), 4),
                "experts_ms": round(calls[p] * (0.15 + 4e-4 * per_tok) * (1 + 0.05 * imbalance), 4),
                "shared_ms": None if layers[i].shared_expert_dim == 0 else round(calls[p] * (0.03 + 8e-5 * per_tok), 4)})
    run = RunData(model={"family": "synthetic", "name": name}, layers=layers, counts=counts,
                  forward_calls=dict(calls), forward_tokens=dict(tokens),
                  timing=timing if timed else None, timing_source="kineto_gpu" if timed else None,
                  settings={"generator": "benchmarks/tb_dashboard_bench.py", "seed": seed})
    return run


def synthetic_kineto(run: RunData, host_pid: int = 4242) -> tuple[dict, list[dict]]:
    """A Chrome trace like torch.profiler's for `run`, and the `steps` list that write_trace wants.

    One `moe_trace/{phase}#{step}` host range per forward (1 prefill + the decode steps), and per
    step and MoE layer a GPU annotation for router, experts and (if any) shared experts, on the
    layer's device (pid = device ordinal), sized from `run.timing` so analyze() gets them back."""
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": host_pid, "tid": 0, "args": {"name": "python"}}]
    steps: list[dict] = []
    ts = 1_000_000.0
    n_dec = max(0, run.forward_calls.get("decode", 0))
    plan = [("prefill", 0)] * max(1, run.forward_calls.get("prefill", 0)) + [("decode", j) for j in range(n_dec)]
    for step, (phase, j) in enumerate(plan):
        calls = max(1, run.forward_calls.get(phase, 1))
        layers = {}
        t = ts + 5.0
        for i, layer in enumerate(run.layers):
            c = run.counts[phase][i]
            ec = np.asarray(c.expert_counts) // calls + ((np.asarray(c.expert_counts) % calls) > j)
            kh = np.asarray(c.k_hist) // calls
            layers[layer.index] = {"expert_counts": ec.tolist(), "k_hist": kh.tolist()}
            dev = layer.device.split(":")[-1]
            pid = int(dev) if dev.isdigit() else host_pid
            for part in ("router", "experts", "shared"):
                ms = (run.timing or {}).get(phase, [{}] * len(run.layers))[i].get(f"{part}_ms")
                if ms is None:
                    continue
                dur = 1000.0 * ms / calls
                events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"moe_trace/{phase}/L{layer.index:03d}/{part}",
                               "pid": pid, "tid": 7, "ts": round(t, 3), "dur": round(dur, 3)})
                t += dur + 1.0
        events.append({"ph": "X", "cat": "user_annotation", "name": f"moe_trace/{phase}#{step}", "pid": host_pid,
                       "tid": host_pid, "ts": ts, "dur": round(t - ts + 5.0, 3)})
        steps.append({"step": step, "phase": phase, "tokens": run.forward_tokens.get(phase, 0) // calls, "layers": layers})
        ts = t + 50.0
    return {"schemaVersion": 1, "deviceProperties": [], "traceEvents": events}, steps


def write_run(run_dir: str | os.PathLike, run: RunData, worker: str = "host_4242", pid: int = 4242) -> Path:
    """Write `run` as moe-trace Kineto trace `{run_dir}/{worker}.pt.trace.json.gz` (moe_trace.trace.write_trace)."""
    from moe_trace.trace import write_trace

    raw, steps = synthetic_kineto(run, host_pid=pid)
    path = Path(run_dir) / f"{worker}.pt.trace.json.gz"
    return write_trace(raw, run, steps, path, process={"dist_rank": None, "world_size": 1, "hostname": "host",
                                                       "pid": pid})


# -- headless Chromium over the DevTools protocol (pipe transport) --------------------------------

def find_chromium() -> str | None:
    for c in (os.environ.get("MOE_TRACE_CHROMIUM"), *CHROMIUM_CANDIDATES):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """A headless Chromium driven over `--remote-debugging-pipe` (JSON messages ending in NUL on fds 3/4)."""

    def __init__(self, executable: str | None = None, width: int = 1440, height: int = 1000, watch: bool = False):
        exe = executable or find_chromium()
        self.watch = watch
        if not exe:
            raise FileNotFoundError("chromium not found (apt-get install chromium)")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="moe-trace-chromium-")
        r_in, w_in = os.pipe()    # we write commands, Chromium reads fd 3
        r_out, w_out = os.pipe()  # Chromium writes replies on fd 4

        def child_fds():
            a, b = os.dup(r_in), os.dup(w_out)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r_in)
        os.close(w_out)
        self._w, self._r = w_in, r_out
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.send("Browser.getVersion", timeout=60)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        mid = self._id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for m in self._read(deadline):
                if m.get("id") == mid:
                    if "error" in m:
                        raise RuntimeError(f"CDP {method}: {m['error']}")
                    return m.get("result", {})
                self.events.append(m)

    def _read(self, deadline: float) -> list[dict]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium exited")
                self._buf += chunk
        msgs = []
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            msgs.append(json.loads(raw))
        return msgs

    def pump(self, seconds: float = 0.0) -> None:
        """Collect pending events for up to `seconds`."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while True:
                self.events.extend(self._read(deadline))

    def new_page(self, fresh_context: bool = True) -> "Page":
        params = {"url": "about:blank"}
        if fresh_context:  # an isolated profile: empty HTTP cache, no localStorage
            params["browserContextId"] = self.send("Target.createBrowserContext", {"disposeOnDetach": True})["browserContextId"]
        target = self.send("Target.createTarget", params)["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, target, session)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser: Chromium, target: str, session: str):
        self.b, self.target, self.session = browser, target, session
        self.cmd("Page.enable")
        if browser.watch:  # console errors and request URLs; off for timing (DevTools' console
            # hooks make V8 collect source positions for every stack trace, which is slow)
            self.cmd("Runtime.enable")
            self.cmd("Network.enable")
        self.cmd("Emulation.setDeviceMetricsOverride",
                 {"width": browser.width, "height": browser.height, "deviceScaleFactor": 1, "mobile": False})

    def cmd(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        return self.b.send(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str) -> None:
        self.b.events.clear()
        self.cmd("Page.navigate", {"url": url})

    def eval(self, expression: str, timeout: float = 30):
        r = self.cmd("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                     timeout=timeout)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error: {r['exceptionDetails'].get('text')} in {expression[:80]!r}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30, poll: float = 0.02):
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                v = self.eval(expression)
                if v:
                    return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r}")
            self.b.pump(poll)

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.b.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == self.session]

    def console_errors(self) -> list[str]:
        out = []
        for e in self.b.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(e["params"]["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])[:500])
        return out

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            h = self.eval("Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)") or self.b.height
            self.cmd("Emulation.setDeviceMetricsOverride",
                     {"width": self.b.width, "height": int(min(h, 12000)), "deviceScaleFactor": 1, "mobile": False})
            self.b.pump(0.3)
        data = self.cmd("Page.captureScreenshot", params, timeout=60)["data"]
        if full_page:
            self.cmd("Emulation.setDeviceMetricsOverride",
                     {"width": self.b.width, "height": self.b.height, "deviceScaleFactor": 1, "mobile": False})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.b.send("Target.closeTarget", {"targetId": self.target}, timeout=5)


# -- TensorBoard ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pyproject_entry_point() -> str:
    """The `tensorboard_plugins` entry point that pyproject.toml declares for moe_trace."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["tensorboard_plugins"]["moe_trace"]


def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "moe_trace" for ep in entry_points(group="tensorboard_plugins"))


def write_dev_entry_point(directory: str) -> str:
    dist = Path(directory) / "moe_trace_tb_dev-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-trace-tb-dev\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[tensorboard_plugins]\nmoe_trace = {pyproject_entry_point()}\n")
    return directory


class TensorBoardProcess:
    """`tensorboard --logdir LOGDIR --host 127.0.0.1 --port FREE` in a subprocess (localhost only)."""

    def __init__(self, logdir: str | os.PathLike, port: int | None = None, timeout: float = 90):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("tensorboard")
        cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
        cmd += ["--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(self.port), "--reload_interval", "0",
                "--load_fast", "false"]
        env = dict(os.environ)
        paths = [str(ROOT)]
        self._ep_dir = None
        if not entry_point_installed():
            # not pip-installed: expose pyproject's entry point through a throw-away dist-info on
            # PYTHONPATH, so the real `tensorboard` finds the plugin the way an installed one is found
            self._ep_dir = tempfile.mkdtemp(prefix="moe-trace-ep-")
            paths.insert(0, write_dev_entry_point(self._ep_dir))
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log = tempfile.NamedTemporaryFile(prefix="moe-trace-tb-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/data/plugins_listing", timeout=5) as r:
                    listing = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"tensorboard did not answer:\n{self.output()}")
                time.sleep(0.2)
        self.listing = listing

    def output(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        if self._ep_dir:
            shutil.rmtree(self._ep_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plugin_url(base: str, run: str | None = None, **params) -> str:
    """The plugin's page exactly as TensorBoard's iframe loads it (`/data/plugin_entry.html`)."""
    from urllib.parse import urlencode

    q = {"name": "moe_trace"}
    if run:
        q["run"] = run
    q.update({k: v for k, v in params.items() if v})
    return f"{base}/data/plugin_entry.html?{urlencode(q)}"


PAINTED = "document.body && document.body.getAttribute('data-painted') === '1'"
# the MoE iframe inside TensorBoard's own page (it may sit inside shadow roots)
FIND_IFRAME = """(() => { const seen = []; const walk = (root) => { for (const el of root.querySelectorAll('*')) {
  if (el.tagName === 'IFRAME') seen.push(el); if (el.shadowRoot) walk(el.shadowRoot); } }; walk(document);
  const f = seen.find((x) => { try { return x.contentDocument && x.contentDocument.body &&
    x.contentDocument.body.getAttribute('data-painted') === '1'; } catch (e) { return false; } });
  return f ? Number(f.contentDocument.body.getAttribute('data-paint-ms')) + (f.contentWindow.performance.timeOrigin - performance.timeOrigin) : null; })()"""


TIMINGS = """JSON.stringify({paint: Number(document.body.getAttribute('data-paint-ms')),
  first: Number(document.body.getAttribute('data-first-paint-ms')),
  state: document.body.getAttribute('data-state'),
  marks: Object.fromEntries(performance.getEntriesByType('mark').map((e) => [e.name, e.startTime]))})"""


def time_plugin_page(browser: Chromium, url: str, timeout: float = 60, fresh: bool = True) -> tuple[dict, Page]:
    """Load the plugin page and wait until painted. Returns ({"paint", "first", "plotly", "draw",
    "driver", "state"} in ms since navigation start, page).

    `paint`: every chart drawn; `first`: overview + heatmap (the first screen) painted; `plotly`:
    plotly.js loaded and evaluated; `draw`: drawing all charts; `driver`: wall time the driver saw
    from the navigate command. `fresh`: a new browser context (empty HTTP and code caches)."""
    page = browser.new_page(fresh_context=fresh)
    t0 = time.perf_counter()
    page.navigate(url)
    page.wait_for(PAINTED, timeout=timeout)
    wall = (time.perf_counter() - t0) * 1000
    t = json.loads(page.eval(TIMINGS))
    m = t.pop("marks")
    t["plotly"] = m.get("moe:plotly")
    t["draw"] = (m["moe:drawn"] - m["moe:draw-start"]) if "moe:drawn" in m and "moe:draw-start" in m else None
    t["driver"] = wall
    return t, page


def time_tb_ui(browser: Chromium, base: str, timeout: float = 90) -> tuple[float, Page]:
    page = browser.new_page()
    page.navigate(f"{base}/#moe_trace")
    ms = page.wait_for(FIND_IFRAME, timeout=timeout)
    return float(ms), page


def save_screenshots(browser: Chromium, tb: "TensorBoardProcess", out: Path, compare: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    page.navigate(plugin_url(tb.url, "big_a"))
    page.wait_for(PAINTED)
    page.screenshot(out / "tb_dashboard.png")
    page.close()
    if compare:
        page = browser.new_page()
        page.navigate(plugin_url(tb.url, "big_a", compare=compare, phase="decode", mode="share"))
        page.wait_for(PAINTED)
        # just the compare section
        y = page.eval("document.getElementById('moe-cmp').getBoundingClientRect().top + window.scrollY")
        h = page.eval("document.getElementById('moe-cmp').getBoundingClientRect().height")
        full = page.eval("Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
        page.cmd("Emulation.setDeviceMetricsOverride", {"width": browser.width, "height": int(full), "deviceScaleFactor": 1,
                                                        "mobile": False})
        browser.pump(0.3)
        data = page.cmd("Page.captureScreenshot", {"format": "png", "clip": {"x": 0, "y": max(0, y - 8), "width": browser.width,
                                                                           "height": h + 16, "scale": 1}})["data"]
        (out / "tb_compare.png").write_bytes(base64.b64decode(data))
        page.close()
    ms, page = time_tb_ui(browser, tb.url)
    page.screenshot(out / "tb_ui.png", full_page=False)
    page.close()
    print(f"screenshots in {out}/: tb_dashboard.png, {'tb_compare.png, ' if compare else ''}tb_ui.png")


def _summary(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    return f"median {statistics.median(vals):.0f} ms (min {min(vals):.0f}, max {max(vals):.0f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tb-ui", action="store_true", help="also time the whole TensorBoard page")
    ap.add_argument("--compare", action="store_true", help="also time the page with a second run compared")
    ap.add_argument("--screenshots", metavar="DIR", help="save screenshots (dashboard, compare, TensorBoard UI) here")
    ap.add_argument("--budget-ms", type=float, default=2000.0)
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)

    exe = find_chromium()
    if not exe:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    results: dict = {"layers": args.layers, "experts": args.experts, "top_k": args.top_k, "cpus": os.cpu_count(),
                     "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="moe-trace-bench-") as logdir:
        t = time.perf_counter()
        write_run(Path(logdir) / "big_a", make_run_data(args.layers, args.experts, args.top_k, seed=0, name="synthetic-a"))
        if args.compare:
            write_run(Path(logdir) / "big_b", make_run_data(args.layers, args.experts, args.top_k, seed=1,
                                                             skew=0.35, name="synthetic-b"))
        size = sum(p.stat().st_size for p in Path(logdir).rglob("*.gz"))
        print(f"run: {args.layers} MoE layers x {args.experts} experts, top-{args.top_k}, 65 steps; trace "
              f"{size / 1e6:.2f} MB gz, written in {time.perf_counter() - t:.1f} s; load average {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs")
        with TensorBoardProcess(logdir) as tb, Chromium(exe) as browser:
            assert tb.listing.get("moe_trace", {}).get("enabled"), f"plugin inactive: {tb.listing.get('moe_trace')}"
            url = plugin_url(tb.url, "big_a")
            cold, page = time_plugin_page(browser, url)
            rows = page.eval("Number(document.getElementById('chart-heatmap').getAttribute('data-rows'))")
            page.close()
            print(f"first load after TensorBoard started (trace parsed on demand): painted at {cold['paint']:.0f} ms, "
                  f"first screen {cold['first']:.0f} ms")
            warm = []
            for i in range(args.repeat):
                r, page = time_plugin_page(browser, url)
                warm.append(r)
                page.close()
            revisit = []
            ctx_page = browser.new_page()  # one context: HTTP cache (and V8 code cache) kept across loads
            ctx = ctx_page.b.send("Target.getTargetInfo", {"targetId": ctx_page.target})["targetInfo"]["browserContextId"]
            for i in range(args.repeat):
                target = browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": ctx})["targetId"]
                p = Page(browser, target, browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"])
                p.navigate(url)
                p.wait_for(PAINTED, timeout=60)
                r = json.loads(p.eval(TIMINGS))
                r["plotly"] = r.pop("marks").get("moe:plotly")
                revisit.append(r)
                p.close()
            ctx_page.close()
            results.update(cold=cold, fresh=warm, revisit=revisit, heatmap_rows=rows)
            print(f"fresh browser profile x{args.repeat} (report cached on the server):")
            for key, label in (("paint", "all charts painted"), ("first", "first screen painted"),
                               ("plotly", "plotly.js evaluated"), ("draw", "drawing the charts")):
                print(f"  {label:<22} {_summary(warm, key)}")
            print(f"revisit in one browser profile (plotly.js from the HTTP cache) x{args.repeat}:")
            print(f"  {'all charts painted':<22} {_summary(revisit, 'paint')}")
            if args.compare:
                cmp = []
                for _ in range(args.repeat):
                    r, page = time_plugin_page(browser, plugin_url(tb.url, "big_a", compare="big_b"))
                    cmp.append(r)
                    page.close()
                results["compare"] = cmp
                print(f"two runs compared, fresh profile x{args.repeat}: {_summary(cmp, 'paint')}")
            if args.tb_ui:
                ui = []
                for _ in range(args.repeat):
                    ms, page = time_tb_ui(browser, tb.url)
                    ui.append({"paint": ms})
                    page.close()
                results["tb_ui"] = ui
                print(f"whole TensorBoard page (/#moe_trace) until the MoE iframe painted x{args.repeat}: "
                      f"{_summary(ui, 'paint')}")
            if args.screenshots:
                save_screenshots(browser, tb, Path(args.screenshots), compare="big_b" if args.compare else None)
    results["loadavg_after"] = os.getloadavg()
    med = statistics.median(r["paint"] for r in warm)
    ok = rows == args.layers and med <= args.budget_ms
    print(f"heatmap rows {rows} (expected {args.layers}); median paint {med:.0f} ms vs budget "
          f"{args.budget_ms:.0f} ms: {'OK' if ok else 'OVER'}; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
