/* The live dashboard page: plain JS, no build step, no dependencies, nothing from elsewhere.
 *
 * It reads the aggregates from the page's `aggregator-meta` data block, builds a form from
 * their parameters, and on every refresh fetches the chosen aggregate, then /status, from this
 * origin. Latency bars come from the answer's Server-Timing header (one entry per source, then
 * `cache` and `total`), each drawn from where its source started (`start`: a source that needs
 * another's answer starts after it, a waterfall); a cache hit has no source entries, so the bars
 * then show the times of the fill that stored it, from the envelope. A failing source, a 4xx/5xx or an unreachable
 * server changes what is drawn, never stops the page: every fetch is caught.
 *
 * The answer is asked for as Server-Sent Events (EventSource, same origin): each source's row is
 * painted the moment its `source` event lands, the others wait as "pending", and the `done`
 * event (the JSON answer's status, the envelope without `data`, X-Cache, Age, Server-Timing)
 * gives the same full render as a JSON answer. If the stream fails before `done`, or no event
 * comes within FIRST_EVENT_MS (a proxy that buffers whole answers), the page fetches the JSON
 * answer instead; after STREAM_FAILURES_MAX such failures in a row it stops trying to stream
 * until it is reloaded. A buffered stream still works: it is rendered on `done`.
 */
"use strict";

(() => {
  const meta = JSON.parse(document.getElementById("aggregator-meta").textContent);
  const aggregates = new Map(meta.aggregates.map((agg) => [agg.name, agg]));
  const byId = (id) => document.getElementById(id);
  const ui = {
    form: byId("query"),
    aggregate: byId("aggregate"),
    path: byId("path"),
    params: byId("params"),
    auto: byId("auto"),
    interval: byId("interval"),
    updated: byId("updated"),
    banner: byId("banner"),
    summary: byId("summary"),
    rows: byId("rows"),
    scope: byId("scope"),
    answer: byId("answer"),
  };
  const FETCH_TIMEOUT_MS = 30000;
  const FIRST_EVENT_MS = 5000;
  const STREAM_FAILURES_MAX = 2;
  // The page's own address holds these controls next to the parameters; a parameter that
  // shares a control's name is written `param:NAME` there (no parameter name has a colon).
  const CONTROLS = new Set(["aggregate", "refresh", "auto"]);
  const pageKey = (name) => (CONTROLS.has(name) ? `param:${name}` : name);
  const state = {
    timer: null,
    controller: null,
    refreshes: 0,
    streamFailures: typeof EventSource === "function" ? 0 : STREAM_FAILURES_MAX,
  };

  // -- small DOM helpers (textContent only: nothing from a response is parsed as HTML) -------

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatMs(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(1)} ms`;
  }

  // -- the form ------------------------------------------------------------------------------

  function current() {
    return aggregates.get(ui.aggregate.value);
  }

  function buildAggregates(selected) {
    for (const agg of meta.aggregates) {
      const option = make("option", "", agg.name);
      option.value = agg.name;
      ui.aggregate.append(option);
    }
    if (aggregates.has(selected)) ui.aggregate.value = selected;
  }

  function buildParams(agg, given) {
    ui.params.replaceChildren();
    ui.path.textContent = agg ? `GET ${agg.path}` : "";
    if (!agg) return;
    for (const [name, spec] of Object.entries(agg.params)) {
      const label = make("label", "field");
      const caption = make("span", "name", spec.required ? `${name} *` : name);
      caption.title = spec.required ? `${spec.type}, required` : `${spec.type}, optional`;
      let input;
      if (spec.type === "bool") {
        input = make("select");
        for (const choice of ["", "true", "false"]) {
          const empty = spec.required ? "choose" : `default (${spec.default})`;
          const option = make("option", "", choice || empty);
          option.value = choice;
          input.append(option);
        }
      } else {
        input = make("input");
        input.type = "text";
        if (spec.type !== "str") input.inputMode = spec.type === "int" ? "numeric" : "decimal";
        input.placeholder = spec.required ? spec.type : `${spec.default} (default)`;
      }
      input.name = name;
      input.dataset.param = name;
      const value = given.get(pageKey(name)) ?? agg.example[name];
      if (value !== undefined && value !== null) {
        input.value = spec.type === "bool" ? boolChoice(value) : String(value);
      }
      label.append(caption, input);
      ui.params.append(label);
    }
  }

  /** The select's choice for any spelling the server accepts (`yes`, `1`, `on`...). */
  function boolChoice(value) {
    const text = String(value).trim().toLowerCase();
    if (["true", "1", "yes", "on"].includes(text)) return "true";
    if (["false", "0", "no", "off"].includes(text)) return "false";
    return "";
  }

  function paramInputs() {
    return Array.from(ui.params.querySelectorAll("[data-param]"));
  }

  function missingRequired(agg) {
    return paramInputs()
      .filter((input) => agg.params[input.name].required && input.value.trim() === "")
      .map((input) => input.name);
  }

  function query() {
    const params = new URLSearchParams();
    for (const input of paramInputs()) {
      input.removeAttribute("aria-invalid");
      if (input.value.trim() !== "") params.set(input.name, input.value.trim());
    }
    return params;
  }

  /** Keep the page's own URL in step, so a view can be bookmarked or shared. */
  function remember(agg, params) {
    const page = new URLSearchParams({ aggregate: agg.name });
    for (const [name, value] of params) page.set(pageKey(name), value);
    page.set("refresh", ui.interval.value);
    if (!ui.auto.checked) page.set("auto", "off");
    history.replaceState(null, "", `?${page}`);
  }

  // -- fetching ------------------------------------------------------------------------------

  /** Server-Timing: `name;dur=1.2;desc="ok";start=0.1, ...` -> Map(name -> {dur, desc, start}). */
  function parseServerTiming(header) {
    const entries = new Map();
    for (const part of (header || "").split(",")) {
      const [name, ...fields] = part.trim().split(";");
      if (!name) continue;
      const entry = { dur: null, desc: "", start: null };
      for (const field of fields) {
        const eq = field.indexOf("=");
        if (eq < 0) continue;
        const key = field.slice(0, eq).trim();
        const value = field.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
        if (key === "dur") entry.dur = Number(value);
        else if (key === "desc") entry.desc = value;
        else if (key === "start") entry.start = Number(value);
      }
      entries.set(name.trim(), entry);
    }
    return entries;
  }

  async function getJson(url, signal) {
    const result = { url, status: 0, headers: null, body: null, error: null };
    try {
      const response = await fetch(url, {
        signal,
        cache: "no-store", // always ask the server: its X-Cache is what we want to see
        headers: { Accept: "application/json" },
      });
      result.status = response.status;
      result.headers = response.headers;
      const text = await response.text();
      try {
        result.body = text ? JSON.parse(text) : null;
      } catch (parseError) {
        result.error = `not JSON (${response.status}): ${text.slice(0, 200)}`;
      }
    } catch (error) {
      result.error = error && error.name === "AbortError" ? "aborted" : String(error);
    }
    return result;
  }

  /**
   * The aggregate as Server-Sent Events: rows painted as sources land; resolves with the answer
   * (as getJson gives one) on `done`, or null when the stream failed or stayed silent.
   */
  function streamAnswer(agg, url, signal) {
    return new Promise((resolve) => {
      const source = new EventSource(url);
      const landed = new Map();
      let settled = false;
      let waiting = null;
      const finish = (answer, { counted = true } = {}) => {
        if (settled) return;
        settled = true;
        clearTimeout(waiting);
        source.close();
        signal.removeEventListener("abort", aborted);
        if (counted) state.streamFailures = answer ? 0 : state.streamFailures + 1;
        resolve(answer);
      };
      const aborted = () => finish(null, { counted: false }); // a newer refresh, or the timeout
      signal.addEventListener("abort", aborted);
      // Nothing at all for a while: a proxy buffers, or the server does not stream. Ask for JSON.
      waiting = setTimeout(() => finish(null), FIRST_EVENT_MS);
      source.addEventListener("source", (event) => {
        clearTimeout(waiting);
        const data = parseEvent(event);
        if (!data || typeof data.source !== "string") return;
        landed.set(data.source, data);
        paintLanded(agg, landed);
      });
      source.addEventListener("done", (event) => {
        const done = parseEvent(event);
        finish(done && typeof done.status === "number" ? answerFromDone(url, done, landed) : null);
      });
      // A failed connection, a non-200, a JSON answer where events were asked for, or the stream
      // cut before `done` (EventSource would reconnect: we fetch the JSON answer instead).
      source.addEventListener("error", () => finish(null));
    });
  }

  function parseEvent(event) {
    try {
      return JSON.parse(event.data);
    } catch (parseError) {
      return null;
    }
  }

  /** What getJson gives, rebuilt from `done` and the `source` events (their `data`). */
  function answerFromDone(url, done, landed) {
    const { status, x_cache: xCache, age, server_timing: timing, ...rest } = done;
    const headers = new Headers();
    if (timing) headers.set("Server-Timing", timing);
    if (xCache) headers.set("X-Cache", xCache);
    if (age !== undefined) headers.set("Age", String(age));
    let body = rest;
    if ("sources" in rest) {
      // A view's `done` keeps its `data`; a configured aggregate's comes from its sources.
      const data = "data" in rest ? rest.data : {};
      if (!("data" in rest)) {
        for (const name of Object.keys(rest.sources)) {
          const event = landed.get(name);
          if (event && "data" in event) data[name] = event.data;
        }
      }
      body = { data, ...rest };
    }
    return { url, status, headers, body, error: null, streamed: true };
  }

  /** The rows as far as the stream has come: landed sources drawn, the others pending. */
  function paintLanded(agg, landed) {
    const names = [...agg.sources, ...[...landed.keys()].filter((n) => !agg.sources.includes(n))];
    const sources = {};
    const errors = {};
    for (const [name, event] of landed) {
      const { source, data, error, ...info } = event;
      sources[name] = info;
      if (error) errors[name] = error;
    }
    const rows = names.map((name) => {
      const info = sources[name];
      return {
        name,
        info,
        ms: info ? info.ms : null,
        start: (info && info.started) || 0,
        live: true,
        pending: !info,
      };
    });
    const scale = Math.max(1, ...rows.map((row) => row.start + (row.ms || 0)));
    const envelope = { sources, errors };
    ui.rows.replaceChildren(...rows.map((row) => drawRow(row, envelope, scale, "…", null)));
    document.body.dataset.landed = String(landed.size);
  }

  async function refresh() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.controller) state.controller.abort();
    const agg = current();
    if (!agg) return;
    const controller = new AbortController();
    state.controller = controller;
    const params = query();
    remember(agg, params);
    const search = params.toString();
    const url = `${meta.root}${agg.path}${search ? `?${search}` : ""}`;
    const giveUp = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    document.body.dataset.loading = "true";
    const streamed = state.streamFailures < STREAM_FAILURES_MAX;
    const answer =
      (streamed && (await streamAnswer(agg, url, controller.signal))) ||
      (await getJson(url, controller.signal));
    // After the answer, so the circuit state shown includes what this answer did to it.
    const status = await getJson(`${meta.root}/status`, controller.signal);
    clearTimeout(giveUp);
    if (state.controller !== controller) return; // a newer refresh took over
    state.controller = null;
    delete document.body.dataset.loading;
    render(agg, answer, status);
    document.body.dataset.via = answer.streamed ? "stream" : "json";
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
    schedule();
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = null;
    if (ui.auto.checked && !document.hidden && !state.controller) {
      state.timer = setTimeout(refresh, Number(ui.interval.value) * 1000);
    }
  }

  // -- drawing -------------------------------------------------------------------------------

  function showBanner(kind, text) {
    ui.banner.hidden = !text;
    ui.banner.className = `banner ${kind}`;
    ui.banner.textContent = text || "";
  }

  function isEnvelope(body) {
    return body !== null && typeof body === "object" && "sources" in body && "data" in body;
  }

  function render(agg, answer, status) {
    const envelope = isEnvelope(answer.body) ? answer.body : null;
    const timings = parseServerTiming(answer.headers && answer.headers.get("Server-Timing"));
    const xCache = answer.headers && answer.headers.get("X-Cache");
    const breakers = status.body && status.body.sources ? status.body.sources : null;

    if (answer.error) {
      showBanner("error", `${agg.path}: ${answer.error}`);
    } else if (!envelope) {
      const body = answer.body || {};
      showBanner("error", `${answer.status} ${body.error || ""}: ${body.message || "no envelope"}`);
      const field = body.field && ui.params.querySelector(`[data-param="${CSS.escape(body.field)}"]`);
      if (field) field.setAttribute("aria-invalid", "true");
    } else if (answer.status >= 500) {
      const failed = agg.required.filter((name) => envelope.errors && envelope.errors[name]);
      showBanner("error", `${answer.status}: required source failed: ${failed.join(", ")}`);
    } else if (envelope.stale && envelope.stale.reason === "refresh_failed") {
      const stale = envelope.stale;
      showBanner(
        "warn",
        `stale answer, ${Math.round(stale.age)} s old: its refresh failed (${stale.detail || "?"})`,
      );
    } else {
      showBanner("", "");
    }

    drawSummary(answer, envelope, timings, xCache, status);
    drawRows(agg, envelope, timings, xCache, breakers);
    ui.answer.textContent = answer.body !== null ? JSON.stringify(answer.body, null, 2) : "";
    ui.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    ui.scope.textContent = status.body
      ? `circuit state from worker ${status.body.worker}: ${status.body.note}.`
      : `circuit state unavailable: ${status.error || status.status}`;
  }

  function chip(label, value, kind) {
    const item = make("li", `chip ${kind || ""}`.trim());
    item.append(make("span", "label", label), make("span", "value", value));
    return item;
  }

  function drawSummary(answer, envelope, timings, xCache, status) {
    const failed = !answer.status || answer.status >= 400;
    const chips = [chip("HTTP", answer.status ? String(answer.status) : "—", failed ? "bad" : "good")];
    if (envelope) {
      const complete = envelope.complete;
      chips.push(chip("answer", complete ? "complete" : "partial", complete ? "good" : "warn"));
    }
    chips.push(chip("X-Cache", xCache || "off"));
    if (envelope && envelope.stale) {
      const failed = envelope.stale.reason === "refresh_failed";
      const why = failed ? "refresh failed" : "refreshing";
      chips.push(chip("stale", `${Math.round(envelope.stale.age)} s, ${why}`, failed ? "bad" : "warn"));
    }
    const cache = timings.get("cache");
    if (cache) chips.push(chip("cache", `${formatMs(cache.dur)} ${cache.desc}`.trim()));
    const total = timings.get("total");
    if (total) chips.push(chip("total", formatMs(total.dur)));
    const age = answer.headers && answer.headers.get("Age");
    if (age !== null && age !== undefined && xCache) chips.push(chip("age", `${age} s`));
    if (status.body) chips.push(chip("worker", String(status.body.worker)));
    ui.summary.replaceChildren(...chips);
  }

  function sourceState(info) {
    if (!info) return "unknown";
    if (info.status === "ok") return "ok";
    return info.fallback ? "fallback" : "error";
  }

  function drawRows(agg, envelope, timings, xCache, breakers) {
    const measured = agg.sources.map((name) => {
      const timing = timings.get(name);
      const info = envelope && envelope.sources ? envelope.sources[name] : undefined;
      // A hit ran no source: show the stored fill's times, and say so.
      const ms = timing && timing.dur !== null ? timing.dur : info ? info.ms : null;
      // When it started (a source that needs another's answer starts after it): the waterfall.
      const start = timing && timing.start !== null ? timing.start : info ? info.started : null;
      return { name, info, ms, start: start || 0, live: Boolean(timing) };
    });
    const total = timings.get("total");
    const scale = Math.max(
      1,
      ...measured.map((row) => row.start + (row.ms || 0)),
      measured.some((row) => row.live) && total ? total.dur : 0,
    );
    ui.rows.replaceChildren(
      ...measured.map((row) => drawRow(row, envelope, scale, xCache, breakers)),
    );
  }

  function drawRow(row, envelope, scale, xCache, breakers) {
    const { name, info, ms, start, live, pending } = row;
    const kind = pending ? "pending" : sourceState(info);
    const tr = make("tr", `source ${kind}`);
    tr.dataset.source = name;
    tr.dataset.state = kind;
    tr.dataset.status = info ? info.status : "";

    const error = envelope && envelope.errors ? envelope.errors[name] : undefined;
    const statusCell = make("td", "status");
    const badge = make("span", `badge ${kind}`, info ? info.status : pending ? "…" : "—");
    statusCell.append(badge);
    if (info && info.fallback) statusCell.append(make("span", "badge fallback-flag", "fallback"));
    if (error) {
      const detail = error.status ? `${error.detail} (HTTP ${error.status})` : error.detail;
      statusCell.append(make("div", "detail", detail));
    }

    const latency = make("td", "latency");
    const bar = make("div", "bar");
    const fill = make("span", `fill ${kind}`);
    const offset = Math.min(100, (start / scale) * 100);
    fill.style.marginLeft = `${offset.toFixed(1)}%`;
    fill.style.width = `${Math.min(100 - offset, ((ms || 0) / scale) * 100).toFixed(1)}%`;
    bar.append(fill);
    const waiting = pending ? "waiting" : "—";
    const text = ms === null ? waiting : `${formatMs(ms)}${live ? "" : " (stored fill)"}`;
    latency.append(bar, make("span", "ms", text));

    const cache = make("td", "cache");
    cache.append(make("span", "tag", xCache || "off"));
    if (info) {
      // Absent: the fill did not consult this source's cache (an upstream is looked up only
      // once this worker has seen it answer cacheably, or it has a cache_ttl).
      cache.append(make("span", "muted", ` source ${info.cache || "not looked up"}`));
    }

    const breaker = breakers ? breakers[name] : undefined;
    const circuit = make("td", "circuit");
    if (breaker) {
      const looks = { closed: "ok", open: "error", half_open: "fallback" }[breaker.circuit];
      circuit.append(make("span", `badge ${looks || "unknown"}`, breaker.circuit.replace("_", "-")));
      const notes = [];
      if (breaker.consecutive_failures && breaker.breaker_failures) {
        notes.push(`${breaker.consecutive_failures}/${breaker.breaker_failures} failures`);
      }
      if (breaker.in_flight) notes.push(`${breaker.in_flight} in flight`);
      if (notes.length) circuit.append(make("span", "muted", ` ${notes.join(", ")}`));
    } else {
      circuit.textContent = "—";
    }

    const header = make("th", "name", name);
    header.scope = "row";
    tr.append(header, statusCell, latency, cache, circuit);
    return tr;
  }

  // -- wiring --------------------------------------------------------------------------------

  function start() {
    const given = new URLSearchParams(location.search);
    const interval = given.get("refresh");
    if (interval && ui.interval.querySelector(`option[value="${CSS.escape(interval)}"]`)) {
      ui.interval.value = interval;
    }
    if (given.get("auto") === "off") ui.auto.checked = false;
    buildAggregates(given.get("aggregate") || "");
    buildParams(current(), given);

    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      refresh();
    });
    ui.aggregate.addEventListener("change", () => {
      buildParams(current(), new URLSearchParams());
      ready();
    });
    ui.auto.addEventListener("change", () => (ui.auto.checked ? refresh() : schedule()));
    ui.interval.addEventListener("change", schedule);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && ui.auto.checked) refresh();
      else schedule();
    });
    ready();
  }

  /** Fetch at once when every required parameter has a value; otherwise say what is missing. */
  function ready() {
    const agg = current();
    if (!agg) {
      showBanner("info", "No aggregates are configured.");
      return;
    }
    const missing = missingRequired(agg);
    if (missing.length) {
      clearTimeout(state.timer);
      showBanner("info", `Fill in ${missing.join(", ")}, then press "Fetch now".`);
      return;
    }
    refresh();
  }

  start();
})();
