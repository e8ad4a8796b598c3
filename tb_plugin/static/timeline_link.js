// moe-trace for TensorBoard: the "Timeline" button of the MoE dashboard (index.js imports this).
//
// When the plugin finds catapult's trace viewer (torch-tb-profiler installed, extra `tbprofiler`),
// a "Timeline" link next to the run selector opens the selected run's trace in it, in a new tab
// (timeline?run=NAME, served by the plugin with the polyfill it ships: works offline).

export async function addTimelineLink() {
  let info = { available: false };
  try {
    const resp = await fetch("timeline_info", { cache: "no-store" });
    if (resp.ok) info = await resp.json();
  } catch (e) { /* no timeline */ }
  const bar = document.querySelector(".moe-bar");
  const runSel = document.getElementById("moe-run");
  if (!bar || !runSel || document.getElementById("moe-timeline")) return;
  const a = document.createElement("a");
  a.id = "moe-timeline";
  a.className = "moe-timeline";
  a.textContent = "Timeline";
  a.target = "_blank";
  a.rel = "noopener";
  const update = () => {
    a.href = "timeline?run=" + encodeURIComponent(runSel.value || "");
  };
  if (info.available) {
    a.title = "Open this run's trace in the catapult trace viewer (offline)";
    runSel.addEventListener("change", update);
    new MutationObserver(update).observe(runSel, { childList: true });
    update();
  } else {
    a.title = info.reason || "the trace viewer is not available";
    a.dataset.unavailable = "1";
    a.setAttribute("aria-disabled", "true");
    a.style.opacity = "0.5";
    a.style.pointerEvents = "none";
  }
  const reload = document.getElementById("moe-reload");
  bar.insertBefore(a, reload || null);
  if (typeof window.moeTimelineAdded === "function") window.moeTimelineAdded();  // the dashboard greys it per run
}
