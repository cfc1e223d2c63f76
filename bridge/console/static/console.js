// Voice Agent Bridge console. Plain JavaScript, no libraries, nothing from the internet.
//
// Safety rules of this file (tests/test_console_static.py checks the first two):
// - Text from callers, the model, tools or records is only ever inserted with textContent /
//   createTextNode (the el() helper), never as HTML.
// - Links are built only from our own URL patterns (callUrl, apiCallUrl, pastUrl) with
//   encodeURIComponent, never from a URL found in data.
// - No inline script, no eval: the page's Content-Security-Policy forbids both anyway.
"use strict";

(function () {
  const CSRF = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const PAGE = document.body.dataset.page;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PAGE_SIZE = 20;
  const MAX_LIVE_TURNS = 200; // per card; the call page has them all
  const SLOW_MS = 1500; // a response slower than this is drawn in the warning colour

  // --- small helpers ------------------------------------------------------------------------

  // el("li", {class: "x", "aria-label": "..."}, child, "text", ...): text children become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) append(node, child);
    return node;
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach((c) => append(node, c));
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function $(id) {
    return document.getElementById(id);
  }

  function str(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  // Our own URLs only: the CallSid is data, so it is always percent-encoded into a fixed path.
  function callUrl(sid) {
    return "/console/calls/" + encodeURIComponent(str(sid));
  }
  function apiCallUrl(sid) {
    return "/api/calls/" + encodeURIComponent(str(sid));
  }
  function pastUrl(params) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v) query.set(k, v);
    const text = query.toString();
    return "/console/past" + (text ? "?" + text : "");
  }

  function formatDuration(seconds) {
    const s = Math.max(0, Math.floor(Number(seconds) || 0));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const rest = String(s % 60).padStart(2, "0");
    return h ? h + ":" + String(m).padStart(2, "0") + ":" + rest : m + ":" + rest;
  }

  function formatTime(iso) {
    const t = Date.parse(str(iso));
    if (Number.isNaN(t)) return str(iso);
    return new Date(t).toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  function label(value) {
    return str(value).replace(/_/g, " ");
  }

  function setStatus(text) {
    const node = $("stream-status");
    if (node) node.textContent = text;
  }

  async function getJson(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) {
      window.location.assign("/console");
      throw new Error("signed out");
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    return response.json();
  }

  async function hangUp(sid, button) {
    if (!window.confirm("End call " + str(sid) + "? The caller will be disconnected.")) return;
    button.disabled = true;
    button.textContent = "Ending…";
    try {
      const response = await fetch(apiCallUrl(sid) + "/hangup", {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": CSRF },
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(str(body.error) || "HTTP " + response.status);
      }
      button.textContent = "Ending call…";
    } catch (error) {
      button.disabled = false;
      button.textContent = "End call";
      window.alert("Could not end the call: " + error.message);
    }
  }

  // --- turns (shared by the live cards and the call page) -----------------------------------

  // The text of an agent turn: what the caller heard, then what they never heard, struck through.
  function agentText(turn) {
    const said = str(turn.text);
    const heard = turn.heard_text === null || turn.heard_text === undefined ? said : str(turn.heard_text);
    if (!said && !heard) return [el("span", { class: "said empty", text: "(no words)" })];
    if (!turn.interrupted || heard === said) return [el("span", { class: "said" }, said)];
    if (said.startsWith(heard)) {
      return [
        el("span", { class: "heard" }, heard),
        el("del", { class: "unheard", title: "not heard by the caller" },
          el("span", { class: "sr-only", text: " (not heard:) " }), said.slice(heard.length)),
      ];
    }
    return [
      el("span", { class: "heard-line" }, el("span", { class: "who", text: "heard" }), heard || "(nothing)"),
      el("span", { class: "said-line" }, el("span", { class: "who", text: "said" }),
        el("del", { class: "unheard", title: "not heard by the caller" }, said)),
    ];
  }

  function turnItem(turn, withMeta) {
    const agent = turn.speaker === "agent";
    const meta = [];
    if (withMeta) {
      meta.push(formatTime(turn.started_at));
      if (agent && typeof turn.response_ms === "number") meta.push("response " + turn.response_ms + " ms");
      if (agent && typeof turn.first_audio_ms === "number") meta.push("first audio " + turn.first_audio_ms + " ms");
      if (agent && turn.interrupted) meta.push("interrupted after " + (Number(turn.heard_ms) / 1000).toFixed(1) + " s");
    }
    return el("li", { class: "turn " + (agent ? "agent" : "caller") },
      el("span", { class: "who", text: agent ? "Agent" : "Caller" }),
      agent ? agentText(turn) : el("span", { class: "said" }, str(turn.text)),
      meta.length ? el("span", { class: "turn-meta" }, " · " + meta.join(" · ")) : null);
  }

  function activityBadge(activity) {
    const text = str(activity) || "connecting";
    return el("span", { class: "activity a-" + text.replace(/[^a-z]+/g, "-"), text });
  }

  // --- live events ---------------------------------------------------------------------------

  // One EventSource per page; reconnects by itself on errors, and after the server drains.
  function connectEvents(handlers) {
    let source = null;
    function open() {
      source = new EventSource("/api/events");
      source.onopen = () => setStatus("live");
      source.onerror = () => setStatus("reconnecting…");
      source.onmessage = (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch (error) {
          return;
        }
        if (event.type === "server.draining") {
          source.close();
          setStatus("server restarting: reconnecting…");
          window.setTimeout(open, 3000);
          return;
        }
        handlers(event);
      };
    }
    open();
  }

  // --- the Live calls page --------------------------------------------------------------------

  function livePage() {
    const calls = new Map(); // CallSid -> {data, offset, card, parts}
    const list = $("live-list");
    let clockOffsetMs = 0; // server clock - browser clock, from each event's "at"

    function ensure(sid, data) {
      let entry = calls.get(sid);
      if (!entry) {
        entry = { data: Object.assign({ turns: [], tools: [] }, data), offset: 0 };
        entry.card = buildCard(sid, entry);
        calls.set(sid, entry);
        list.prepend(entry.card);
      }
      return entry;
    }

    function buildCard(sid, entry) {
      const parts = {};
      parts.activity = el("span", { class: "activity-slot" });
      parts.duration = el("span", { class: "duration", "aria-label": "duration" });
      parts.parties = el("span", { class: "meta" });
      parts.transcript = el("ol", { class: "transcript", "aria-label": "Transcript of " + sid, "aria-live": "polite" });
      parts.tool = el("span", { class: "meta" });
      // Named with its CallSid: a screen reader lists one "End call" per live card otherwise.
      const button = el("button", { type: "button", class: "danger", text: "End call", "aria-label": "End call " + sid });
      button.addEventListener("click", () => hangUp(sid, button));
      entry.parts = parts;
      const card = el("li", { class: "card", "data-call-sid": sid },
        el("div", { class: "card-head" },
          el("a", { href: callUrl(sid), class: "mono" }, sid), parts.activity, parts.duration),
        parts.parties,
        parts.transcript,
        el("div", { class: "card-foot" }, parts.tool, button));
      entry.card = card;
      refresh(entry);
      return card;
    }

    function refresh(entry) {
      const d = entry.data;
      const p = entry.parts;
      clear(p.activity);
      p.activity.appendChild(activityBadge(d.activity));
      p.parties.textContent = label(d.direction) + " · from " + (str(d.from) || "?") + " to " + (str(d.to) || "?");
      tick(entry);
      renderTranscript(entry);
      const running = (d.tools || []).filter((t) => t && t.duration_ms === null);
      p.tool.textContent = running.length ? "tool: " + running.map((t) => str(t.name)).join(", ") : "";
    }

    function renderTranscript(entry) {
      const p = entry.parts;
      const atBottom = p.transcript.scrollHeight - p.transcript.scrollTop - p.transcript.clientHeight < 24;
      clear(p.transcript);
      const turns = (entry.data.turns || []).filter(Boolean).slice(-MAX_LIVE_TURNS);
      for (const turn of turns) p.transcript.appendChild(turnItem(turn, false));
      if (atBottom) p.transcript.scrollTop = p.transcript.scrollHeight;
    }

    function tick(entry) {
      const started = Date.parse(str(entry.data.started_at));
      if (Number.isNaN(started)) return;
      entry.parts.duration.textContent = formatDuration((Date.now() + clockOffsetMs - started) / 1000);
    }

    function updateEmpty() {
      $("live-empty").hidden = calls.size > 0;
      $("live-count").textContent = calls.size ? "(" + calls.size + ")" : "";
    }

    function ended(sid, event) {
      const entry = calls.get(sid);
      if (!entry) return;
      calls.delete(sid);
      entry.card.remove();
      const item = el("li", {},
        el("a", { href: callUrl(sid), class: "mono" }, sid),
        el("span", { class: "meta" }, " · " + label(event.outcome) + " · " + formatDuration(event.duration_s)));
      const endedList = $("ended-list");
      endedList.prepend(item);
      while (endedList.children.length > 10) endedList.lastChild.remove();
      $("ended-box").hidden = false;
      updateEmpty();
    }

    function handle(event) {
      const at = Date.parse(str(event.at));
      if (!Number.isNaN(at)) clockOffsetMs = at - Date.now();
      if (event.type === "snapshot") {
        const seen = new Set();
        for (const call of event.calls || []) {
          const sid = str(call.call_sid);
          seen.add(sid);
          const entry = ensure(sid, call);
          entry.data = call;
          entry.offset = Number(call.turns_offset) || 0;
          refresh(entry);
        }
        for (const sid of Array.from(calls.keys())) if (!seen.has(sid)) ended(sid, { outcome: "ended" });
        updateEmpty();
        return;
      }
      const sid = str(event.call_sid);
      if (!sid) return;
      if (event.type === "call.ended") {
        ended(sid, event);
        return;
      }
      const entry = ensure(sid, { call_sid: sid });
      const d = entry.data;
      if (event.type === "call.started") {
        Object.assign(d, { direction: event.direction, from: event.from, to: event.to,
          started_at: event.started_at, activity: event.activity });
      } else if (event.type === "call.updated") {
        d.activity = event.activity;
        if (!d.started_at && typeof event.duration_s === "number") {
          d.started_at = new Date(Date.now() + clockOffsetMs - event.duration_s * 1000).toISOString();
        }
      } else if (event.type === "turn") {
        const index = Number(event.index) - entry.offset;
        if (index >= 0) d.turns[index] = event.turn; // the same index again replaces the turn
      } else if (event.type === "tool") {
        const index = Number(event.index);
        if (index >= 0) d.tools[index] = event.tool;
      } else {
        return;
      }
      refresh(entry);
      updateEmpty();
    }

    updateEmpty();
    connectEvents(handle);
    window.setInterval(() => calls.forEach(tick), 250); // a whole second never shows late
  }

  // --- the Past calls page --------------------------------------------------------------------

  function dayStartIso(value, plusDays) {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(str(value));
    if (!m) return "";
    return new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3]) + plusDays).toISOString();
  }

  async function pastPage() {
    const params = new URLSearchParams(window.location.search);
    const filters = {
      q: params.get("q") || "", outcome: params.get("outcome") || "",
      since: params.get("since") || "", until: params.get("until") || "",
    };
    $("f-q").value = filters.q;
    $("f-outcome").value = filters.outcome;
    $("f-since").value = filters.since;
    $("f-until").value = filters.until;
    const before = params.get("before") || "";

    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (filters.q) query.set("q", filters.q);
    if (filters.outcome) query.set("outcome", filters.outcome);
    if (filters.since) query.set("since", dayStartIso(filters.since, 0));
    if (filters.until) query.set("until", dayStartIso(filters.until, 1)); // the whole "to" day
    if (before) query.set("before", before);

    const status = $("past-status");
    status.textContent = "Loading…";
    let body;
    try {
      body = await getJson("/api/calls?" + query.toString());
    } catch (error) {
      status.textContent = "Could not load calls: " + error.message;
      return;
    }
    const rows = (Array.isArray(body) ? body : body.calls || []).filter((c) => c && !c.live);
    const next = Array.isArray(body) ? null : body.next_before;
    const tbody = $("past-rows");
    clear(tbody);
    for (const call of rows) {
      const sid = str(call.call_sid);
      const bad = call.outcome && !["caller_hung_up", "agent_ended", "transferred"].includes(call.outcome);
      tbody.appendChild(el("tr", { "data-call-sid": sid },
        el("td", { "data-label": "Started" }, formatTime(call.started_at)),
        el("td", { "data-label": "Call" }, el("a", { href: callUrl(sid), class: "mono" }, sid)),
        el("td", { "data-label": "Direction" }, label(call.direction)),
        el("td", { "data-label": "From" }, str(call.from)),
        el("td", { "data-label": "To" }, str(call.to)),
        el("td", { "data-label": "Duration" }, formatDuration(call.duration_s)),
        el("td", { "data-label": "Outcome" },
          el("span", { class: "outcome" + (bad ? " bad" : "") }, label(call.outcome) || "–"),
          call.reason ? el("span", { class: "meta" }, " " + str(call.reason)) : null),
        el("td", { "data-label": "Turns" },
          str(call.turn_count) + (call.interrupted_count ? " (" + call.interrupted_count + " interrupted)" : ""))));
    }
    $("past-table").hidden = rows.length === 0;
    const filtered = filters.q || filters.outcome || filters.since || filters.until;
    status.textContent = rows.length ? "" : filtered ? "No calls match these filters." : "No past calls yet.";
    const first = $("page-first");
    first.hidden = !before;
    first.href = pastUrl(filters);
    const older = $("page-older");
    older.hidden = !next;
    if (next) older.href = pastUrl(Object.assign({}, filters, { before: str(next) }));
  }

  // --- a Call page ----------------------------------------------------------------------------

  function latencyChart(turns) {
    const bars = [];
    turns.forEach((turn, i) => {
      if (!turn || turn.speaker !== "agent") return;
      if (typeof turn.response_ms === "number") bars.push({ turn: i + 1, ms: turn.response_ms, greeting: false });
      else if (typeof turn.first_audio_ms === "number") bars.push({ turn: i + 1, ms: turn.first_audio_ms, greeting: true });
    });
    if (!bars.length) return el("p", { class: "empty", text: "No agent replies with audio yet." });
    // The scale's top: the slowest reply rounded up to 500 ms, and wide enough room for its label.
    const max = Math.max(500, Math.ceil(Math.max(...bars.map((b) => b.ms)) / 500) * 500);
    const barW = 28, gap = 14, top = 18, plotH = 120, bottom = 30;
    const left = Math.max(44, 14 + 7 * (max + " ms").length);
    const width = Math.max(240, left + bars.length * (barW + gap) + gap);
    const height = top + plotH + bottom;
    const description = bars.map((b) => "turn " + b.turn + (b.greeting ? " (greeting, first audio)" : "") + ": " + b.ms + " ms");
    const chart = svg("svg", {
      width, height, viewBox: "0 0 " + width + " " + height, role: "img", id: "latency-svg",
      "aria-label": "Response latency per turn. " + description.join("; "),
    });
    const title = svg("title");
    title.textContent = "Response latency per turn";
    chart.appendChild(title);
    chart.appendChild(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: width, y2: top + plotH }));
    chart.appendChild(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }));
    const maxLabel = svg("text", { class: "axis-label", x: left - 4, y: top + 4, "text-anchor": "end" });
    maxLabel.textContent = max + " ms";
    chart.appendChild(maxLabel);
    const zero = svg("text", { class: "axis-label", x: left - 4, y: top + plotH, "text-anchor": "end" });
    zero.textContent = "0";
    chart.appendChild(zero);
    bars.forEach((b, i) => {
      const h = Math.max(1, Math.round((b.ms / max) * plotH));
      const x = left + gap + i * (barW + gap);
      const rect = svg("rect", {
        class: "bar" + (b.greeting ? " greeting" : b.ms > SLOW_MS ? " slow" : ""),
        x, y: top + plotH - h, width: barW, height: h, "data-ms": b.ms, "data-turn": b.turn,
      });
      const tip = svg("title");
      tip.textContent = description[i];
      rect.appendChild(tip);
      chart.appendChild(rect);
      const value = svg("text", { class: "bar-label", x: x + barW / 2, y: top + plotH - h - 4, "text-anchor": "middle" });
      value.textContent = String(b.ms);
      chart.appendChild(value);
      const name = svg("text", { class: "axis-label", x: x + barW / 2, y: top + plotH + 14, "text-anchor": "middle" });
      name.textContent = b.greeting ? "greet" : "#" + b.turn;
      chart.appendChild(name);
    });
    const unit = svg("text", { class: "axis-label", x: left, y: height - 2 });
    unit.textContent = "greet = first audio";
    chart.appendChild(unit);
    return chart;
  }

  function toolItem(tool) {
    const args = typeof tool.arguments === "string" ? tool.arguments : JSON.stringify(tool.arguments, null, 2);
    const state = tool.duration_ms === null || tool.duration_ms === undefined
      ? "running" : tool.duration_ms + " ms" + (tool.is_error ? " · error" : "");
    return el("li", { class: "tool" + (tool.is_error ? " error" : "") },
      el("div", {}, el("strong", { class: "mono" }, str(tool.name)), el("span", { class: "meta" }, " · " + state)),
      el("div", { class: "meta" }, "arguments"), el("pre", {}, str(args)),
      el("div", { class: "meta" }, "result"), el("pre", {}, tool.result === null ? "(none yet)" : str(tool.result)));
  }

  async function callPage() {
    const prefix = "/console/calls/";
    let sid = "";
    try {
      sid = decodeURIComponent(window.location.pathname.slice(prefix.length));
    } catch (error) {
      sid = "";
    }
    $("call-title").textContent = "Call " + sid;
    document.title = "Call " + sid + " — Voice Agent Bridge console";
    $("call-json").href = apiCallUrl(sid);
    const status = $("call-status");
    let loading = false;
    let liveSince = null; // browser time (ms) when a live call's duration was 0; null once it ended
    let again = false;

    async function load() {
      if (loading) {
        again = true;
        return;
      }
      loading = true;
      try {
        const record = await getJson(apiCallUrl(sid));
        render(record.record || record);
        status.textContent = "";
      } catch (error) {
        status.textContent = error.message === "HTTP 404" ? "No record of this call." : "Could not load the call: " + error.message;
      } finally {
        loading = false;
        if (again) {
          again = false;
          window.setTimeout(load, 250);
        }
      }
    }

    function render(r) {
      $("call-body").hidden = false;
      const facts = $("call-facts");
      clear(facts);
      const rows = [
        ["Status", r.live ? "live · " + str(r.activity || "") : "ended"],
        ["Direction", label(r.direction)], ["From", str(r.from)], ["To", str(r.to)],
        ["Started", formatTime(r.started_at)], ["Ended", r.ended_at ? formatTime(r.ended_at) : "–"],
        ["Duration", formatDuration(r.duration_s)],
        ["Outcome", label(r.outcome) || "–"], ["Reason", str(r.reason) || "–"],
        ["Upstream seconds", typeof r.upstream_open_s === "number" ? r.upstream_open_s.toFixed(1) + " s" : "–"],
        ["Agent sessions", (r.agent_session_ids || []).map(str).join(", ") || "–"],
      ];
      for (const [name, value] of rows) facts.append(el("div", {}, el("dt", {}, name), el("dd", { "data-fact": name }, value)));
      const hang = $("call-hangup");
      hang.hidden = !r.live;
      // From the record's own duration, not its start: the browser's clock may be off the server's.
      liveSince = r.live && typeof r.duration_s === "number" ? Date.now() - r.duration_s * 1000 : null;
      const audioPath = r.recording || r.audio_path || r.recording_path;
      $("recording-box").hidden = !audioPath;
      if (audioPath && !$("recording").getAttribute("src")) $("recording").setAttribute("src", callUrl(sid) + "/recording");
      const chartBox = $("latency-chart");
      clear(chartBox);
      const turns = (r.turns || []).filter(Boolean);
      chartBox.appendChild(latencyChart(turns));
      const list = $("call-turns");
      clear(list);
      for (const turn of turns) list.appendChild(turnItem(turn, true));
      if (!turns.length) list.appendChild(el("li", { class: "empty", text: "No turns yet." }));
      const tools = (r.tools || []).filter(Boolean);
      const toolList = $("call-tools");
      clear(toolList);
      for (const tool of tools) toolList.appendChild(toolItem(tool));
      $("tools-empty").hidden = tools.length > 0;
      const dtmf = (r.dtmf || []).map((d) => str(d && d.digit));
      $("dtmf-box").hidden = !dtmf.length;
      $("call-dtmf").textContent = dtmf.join(" ");
    }

    const hang = $("call-hangup");
    hang.addEventListener("click", () => hangUp(sid, hang));
    window.setInterval(() => { // a live call's duration ticks between events
      const cell = document.querySelector('#call-facts dd[data-fact="Duration"]');
      if (liveSince !== null && cell) cell.textContent = formatDuration((Date.now() - liveSince) / 1000);
    }, 250);
    status.textContent = "Loading…";
    await load();
    // While the call is live, every event about it reloads the record (coalesced).
    connectEvents((event) => {
      if (event.call_sid === sid || event.type === "snapshot") load();
    });
  }

  // --- start ---------------------------------------------------------------------------------

  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === PAGE) link.setAttribute("aria-current", "page");
  }
  const view = $("view-" + PAGE);
  if (view) view.hidden = false;
  if (PAGE === "live") livePage();
  else if (PAGE === "past") {
    setStatus("");
    pastPage();
  } else if (PAGE === "call") callPage();
})();
