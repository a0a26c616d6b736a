// vmha console: renders this node's status (and the peer's, as known),
// live through server-sent events; actions go to /api/action with the
// session's CSRF token. No framework, no build step.
"use strict";

let csrf = "";
let localNode = "";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function age(ms) {
  if (ms === null || ms === undefined) return "never";
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
}

function stateCell(n) {
  if (!n.reachable) {
    const last = n.last_known_state || n.state || "?";
    return el("span", { class: "state grey", title: "unreachable: last known state" }, last);
  }
  return el("span", { class: "state " + (n.colour || "grey") }, n.state || "?");
}

function resyncCell(r) {
  if (!r) return "";
  const pct = r.total_bytes ? Math.floor(100 * r.done_bytes / r.total_bytes) : 100;
  const bar = el("span", { class: "bar" }, el("span", { style: "width:" + pct + "%" }));
  const eta = r.eta_s === null ? "ETA ?" : "ETA " + r.eta_s + " s";
  return el("span", {}, bar, " " + pct + "% of " + bytes(r.total_bytes) + ", " + bytes(r.rate_bytes_per_s) + "/s, " + eta);
}

function heartbeatsCell(n) {
  if (!n.heartbeats) return "";
  return Object.entries(n.heartbeats).map(([a, ms]) => a + ": " + age(ms)).join(", ");
}

async function act(action, module, node) {
  const body = { action, module, node: node || localNode };
  if (action === "prim") {
    const typed = window.prompt("Force " + module + " primary on " + body.node +
      " with its local data? Changes the other node made since the last sync would be discarded.\nType the module's name to confirm:");
    if (typed === null) return;
    body.confirm = typed;
  }
  const r = await fetch("/api/action", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let text;
  let ok = r.ok;
  try {
    const a = await r.json();
    ok = ok && a.ok;
    text = action + " " + module + " on " + body.node + ": " + (a.ok ? "done" : "refused: " + (a.error || "")) +
      (a.lines && a.lines.length ? "\n" + a.lines.join("\n") : "");
  } catch (e) {
    text = action + " " + module + ": HTTP " + r.status;
    ok = false;
  }
  const res = document.getElementById("result");
  res.hidden = false;
  res.className = ok ? "" : "error";
  res.textContent = text;
}

async function showLog(module) {
  const r = await fetch("/api/log?module=" + encodeURIComponent(module), { credentials: "same-origin" });
  if (!r.ok) return;
  const lines = await r.json();
  document.getElementById("log").hidden = false;
  document.getElementById("log-title").textContent = "Event log: " + module + " (both nodes, by time)";
  document.getElementById("log-lines").textContent = lines.join("\n");
}

function render(view) {
  const status = view.local;
  localNode = status.node;
  document.getElementById("node").textContent = "— " + status.node;
  const root = document.getElementById("cluster");
  const tables = [];
  for (const m of status.modules) {
    const head = el("tr", {},
      ...["node", "state", "readiness", "generation", "resync", "heartbeats", "maintenance", "actions"].map(h => el("th", {}, h)));
    const rows = [head];
    const peerStatus = view.peer;
    const link = view.peer_link;
    for (const [name, n0] of Object.entries(m.nodes)) {
      let n = n0;
      const local = name === status.node;
      // The peer's own answer (last known), over the channel between the daemons.
      let stale = false;
      let from = "";
      if (!local && peerStatus) {
        const pm = peerStatus.modules.find(x => x.name === m.name);
        if (pm && pm.nodes[name]) {
          n = Object.assign({}, pm.nodes[name], { heartbeats: n0.heartbeats, last_seen_ms: n0.last_seen_ms });
          stale = !!link && !link.reachable;
          from = stale ? " (last known " + age(link.age_ms) + " ago, its vmhad unreachable)" : " (its own view)";
          if (stale) n.reachable = false;
        }
      }
      const remote = !local && !!link;
      const actions = (local || remote) ? el("td", { class: "actions" },
        ...["start", "stop", "swap", "prim", "verify", "maintenance-on", "maintenance-off"].map(a =>
          el("button", { type: "button", "data-action": a, "data-module": m.name, "data-node": name, onclick: () => act(a, m.name, name) }, a)),
        local ? el("button", { type: "button", onclick: () => showLog(m.name) }, "log") : null) : el("td", {});
      const seen = local ? "" : " (seen " + age(n.last_seen_ms) + " ago)" + from;
      rows.push(el("tr", { class: (n.reachable && !stale) ? "" : "stale", "data-node": name },
        el("td", {}, name + (local ? " (this node)" : "") + seen),
        el("td", { class: "state-cell" }, stateCell(n)),
        el("td", {}, n.readiness || "unknown"),
        el("td", { title: n.generation || "" }, n.generation ? n.generation.slice(0, 8) : "none"),
        el("td", {}, resyncCell(n.resync)),
        el("td", {}, heartbeatsCell(n)),
        el("td", {}, n.maintenance ? "on" : "off"),
        actions));
    }
    const events = (view.events[m.name] || []).join("\n");
    tables.push(el("table", { "data-module": m.name },
      el("caption", {}, el("h2", {}, m.name + " (domain " + m.domain + ", primary: " + (m.primary || "none") + ")")),
      ...rows,
      el("tr", {}, el("td", { colspan: "8", class: "events" }, events))));
  }
  if (status.witness) {
    const w = status.witness;
    tables.push(el("p", {}, "Witness " + w.addresses.join(", ") + ": " + (w.last_probe || "not probed yet") +
      (w.errors.length ? " — " + w.errors.join("; ") : "")));
  }
  if (status.config_differences && status.config_differences.length) {
    tables.push(el("p", { class: "red state" }, "configuration differs from the peer: " + status.config_differences.join(", ")));
  }
  root.replaceChildren(...tables);
}

async function main() {
  const r = await fetch("/api/status", { credentials: "same-origin" });
  if (r.status === 401) { window.location = "/login"; return; }
  const s = await r.json();
  csrf = s.csrf;
  document.getElementById("logout-csrf").value = csrf;
  render(s);
  const live = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.addEventListener("status", e => {
    live.className = "live";
    live.textContent = "live";
    render(JSON.parse(e.data));
  });
  source.onerror = () => { live.className = "live off"; live.textContent = "reconnecting"; };
}

document.addEventListener("DOMContentLoaded", main);
