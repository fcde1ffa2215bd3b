/* celery-spawn dashboard: recent operations, stats and an interactive spawn tree.
 *
 * Plain JavaScript, no build step, no CDN. Every value from the API is put in
 * the page with textContent (never innerHTML): task names, queues and errors
 * are data, not markup. The API token, when the server wants one, comes from
 * the URL fragment (#token=...), never sent to the server in a URL, or from the
 * form that appears on a 401; it is kept in sessionStorage for this tab.
 */
"use strict";

(function () {
  const FINAL = new Set(["succeeded", "failed", "revoked", "cancelled", "lost"]);
  const JOB_STATES = ["pending", "held", "scheduled", "dispatched", "started", "retrying", "succeeded", "failed", "revoked",
                      "cancelled", "lost"];
  const ID_PATTERN = /^[A-Za-z0-9._:~-]{1,64}$/;
  const TREE_REFRESH_MS = 2000;
  const LIST_REFRESH_MS = 5000;
  const TREE_DEPTH = 10;          // levels fetched per tree (deeper ones: "… N more", click to open)
  const EXPANDED_LEVELS = 2;      // levels open when a tree is first shown
  const CHILDREN_PAGE = 100;      // children drawn per node before a "show more" button
  const TOKEN_KEY = "celery-spawn-token";

  const base = new URL(".", window.location.href);
  const $ = (id) => document.getElementById(id);

  const view = {
    token: null,
    jobId: null,          // the job whose tree is shown
    tree: null,           // its last answer
    expanded: new Set(),  // job ids open in the tree
    shown: new Map(),     // job id -> children drawn
    treeTimer: null,
    listTimer: null,
  };

  // ---- API ------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, params, method) {
    const url = new URL("api/" + path, base);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, String(value));
    }
    const headers = { Accept: "application/json" };
    if (view.token) headers.Authorization = "Bearer " + view.token;
    let response;
    try {
      response = await fetch(url, { method: method || "GET", headers, cache: "no-store" });
    } catch (err) {
      setLive(false, "server unreachable");
      throw new ApiError("the server cannot be reached", 0);
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (response.status === 401) {
      $("token-form").hidden = false;
      throw new ApiError((body && body.error) || "an API token is needed", 401);
    }
    if (!response.ok) throw new ApiError((body && body.error) || response.statusText, response.status);
    setLive(true);
    return body;
  }

  // ---- small DOM helpers ------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else if (key === "title" || key === "type" || key === "role" || key === "aria-expanded" || key === "hidden") {
        node.setAttribute(key, value === true ? "" : String(value));
      } else node[key] = value;
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(state, count) {
    return el("span", { class: "badge state-" + safeClass(state), "data-state": state },
              state || "-", count === undefined ? null : el("span", { class: "n", text: String(count) }));
  }

  function safeClass(text) { return String(text || "").replace(/[^a-z_]/g, ""); }
  function shortId(id) { return id && id.length > 12 ? id.slice(0, 8) + "…" : (id || "-"); }
  function percent(value) { return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + "%"; }
  function number(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits === undefined ? 0 : digits);
  }
  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return (value * 1000).toFixed(0) + " ms";
    if (value < 120) return value.toFixed(2) + " s";
    if (value < 7200) return (value / 60).toFixed(1) + " min";
    return (value / 3600).toFixed(1) + " h";
  }
  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString();
  }

  function message(text, kind) {
    const box = $("message");
    box.hidden = !text;
    box.textContent = text || "";
    box.className = "message" + (kind === "info" ? " info" : "");
  }

  function setLive(ok, why) {
    const live = $("live");
    live.className = "live " + (ok ? "ok" : "down");
    live.textContent = ok ? "live · updated " + new Date().toLocaleTimeString() : (why || "offline");
  }

  /** A bar of child states: finished parts solid, running and waiting ones faint. */
  function progressBar(counts, progress, mini) {
    const total = (progress && progress.total) || Object.values(counts || {}).reduce((a, b) => a + b, 0);
    const done = progress ? progress.done : 0;
    const bar = el("div", { class: "bar", role: "img", title: JOB_STATES.filter((s) => counts && counts[s])
      .map((s) => s + " " + counts[s]).join(", ") || "no children" });
    for (const state of JOB_STATES) {
      const n = (counts || {})[state];
      if (!n || !total) continue;
      const part = el("span", { class: "seg-" + state, "data-state": state });
      part.style.width = (100 * n / total).toFixed(2) + "%";
      bar.append(part);
    }
    const pct = progress && progress.percent !== null && progress.percent !== undefined
      ? " (" + Math.round(progress.percent) + "%)" : "";
    return el("div", { class: "progress" + (mini ? " mini" : ""), "data-done": done, "data-total": total },
              bar, el("span", { class: "text", text: done + "/" + total + pct }));
  }

  // ---- stats ------------------------------------------------------------------------------------
  async function loadStats() {
    const stats = await api("spawn/stats", { hours: 24 });
    const cards = [
      ["Operations", stats.operations, "operations"],
      ["Children", stats.children, "children"],
      ["Success rate", percent(stats.success_rate), "success_rate"],
      ["Child success rate", percent(stats.child_success_rate), "child_success_rate"],
      ["Children per spawn", number(stats.avg_children_per_spawn, 1), "avg_children_per_spawn"],
      ["Largest spawn", number(stats.max_children_per_spawn), "max_children_per_spawn"],
      ["Avg child run", seconds(stats.durations.child_avg_seconds), "child_avg_seconds"],
      ["Avg operation", seconds(stats.durations.operation_avg_seconds), "operation_avg_seconds"],
    ];
    $("stats").replaceChildren(...cards.map(([label, value, key]) =>
      el("div", { class: "card", "data-stat": key },
         el("div", { class: "value", text: String(value) }), el("div", { class: "label", text: label }))));
    const line = (title, counts) => el("div", {}, title + ": ",
      Object.keys(counts).length ? Object.entries(counts).flatMap(([s, n]) => [badge(s, n), " "]) : "none");
    $("stats-states").replaceChildren(line("Operations", stats.operations_by_state),
                                      line("Children", stats.children_by_state));
  }

  // ---- operations -------------------------------------------------------------------------------
  async function loadOperations() {
    const answer = await api("spawn/operations", {
      limit: $("filter-limit").value, state: $("filter-state").value, queue: $("filter-queue").value.trim(),
      operation: $("filter-operation").value.trim(),
    });
    const body = $("operations").tBodies[0];
    if (!answer.operations.length) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colSpan: 8, text: "No spawn operations." })));
      return;
    }
    body.replaceChildren(...answer.operations.map(operationRow));
  }

  function operationRow(op) {
    const open = () => showTree(op.parent_id, true);
    const cancel = op.state === "running"
      ? el("button", { type: "button", title: "Cancel this operation's unfinished children", text: "Cancel",
                       onclick: (event) => { event.stopPropagation(); cancelOperation(op.id); } })
      : null;
    return el("tr", { class: "operation" + (op.parent_id === view.jobId ? " selected" : ""),
                      "data-operation-id": op.id, "data-state": op.state, onclick: open,
                      title: op.error ? "error: " + op.error : null },
      el("td", { text: when(op.created_at) }),
      el("td", { class: "id", title: op.label ? op.id + " (label " + op.label + ")" : op.id,
                 text: op.label || shortId(op.id) }),
      el("td", {}, el("button", { class: "link id", type: "button", title: "Show the tree of " + op.parent_id,
                                  text: shortId(op.parent_id), onclick: (e) => { e.stopPropagation(); open(); } })),
      el("td", { text: op.handler || "–" }),
      el("td", { text: op.queue || "–" }),
      el("td", {}, badge(op.state)),
      el("td", {}, progressBar(op.counts, op.progress)),
      el("td", {}, cancel));
  }

  async function cancelOperation(operationId) {
    if (!window.confirm("Cancel the unfinished children of operation " + operationId + "?")) return;
    try {
      const result = await api("spawn/operations/" + encodeURIComponent(operationId) + "/cancel", {}, "POST");
      message("Cancelled " + result.cancelled + " waiting and revoked " + result.revoked + " running children"
              + (result.note ? " (" + result.note + ")" : "") + ".", "info");
      refreshLists();
      if (view.jobId) refreshTree();
    } catch (err) {
      message("Cancel failed: " + err.message);
    }
  }

  // ---- the tree ---------------------------------------------------------------------------------
  async function showTree(jobId, scroll) {
    jobId = (jobId || "").trim();
    if (!ID_PATTERN.test(jobId)) {
      message("Not a job id: " + jobId.slice(0, 80));
      return;
    }
    message("");
    if (jobId !== view.jobId) {
      view.jobId = jobId;
      view.tree = null;
      view.expanded = new Set();
      view.shown = new Map();
    }
    $("job-input").value = jobId;
    const url = new URL(window.location.href);
    url.searchParams.set("job", jobId);
    window.history.replaceState(null, "", url);
    for (const row of document.querySelectorAll("tr.operation")) {
      row.classList.toggle("selected", row.querySelector("button.link").title.endsWith(" " + jobId));
    }
    await refreshTree();
    if (scroll) $("tree-section").scrollIntoView({ block: "start", behavior: "smooth" });
  }

  async function refreshTree() {
    clearTimeout(view.treeTimer);
    const jobId = view.jobId;
    if (!jobId) return;
    let answer;
    try {
      answer = await api("jobs/" + encodeURIComponent(jobId) + "/spawn-tree", { format: "json", max_depth: TREE_DEPTH });
    } catch (err) {
      if (jobId !== view.jobId) return;
      $("tree").replaceChildren(el("p", { class: "more", text: err.message }));
      $("tree-meta").replaceChildren();
      if (err.status !== 404 && err.status !== 400) view.treeTimer = setTimeout(refreshTree, TREE_REFRESH_MS);
      return;
    }
    if (jobId !== view.jobId) return;  // another tree was asked for meanwhile
    if (!view.tree) openFirstLevels(answer.tree);
    view.tree = answer;
    const running = Object.keys(answer.summary.states).some((state) => !FINAL.has(state));
    drawTreeMeta(answer, running);
    $("tree").replaceChildren(el("ul", { role: "group" }, drawNode(answer.tree, null)));
    $("tree-up").hidden = !(answer.tree.depth > 0);
    if (running) view.treeTimer = setTimeout(refreshTree, TREE_REFRESH_MS);
  }

  function openFirstLevels(root) {
    const stack = [[root, 0]];
    while (stack.length) {
      const [node, level] = stack.pop();
      if (level >= EXPANDED_LEVELS || !node.children.length) continue;
      view.expanded.add(node.id);
      for (const child of node.children) stack.push([child, level + 1]);
    }
  }

  function drawTreeMeta(answer, running) {
    const s = answer.summary;
    $("tree-meta").replaceChildren(
      el("span", { "data-tree-state": running ? "running" : "finished",
                   text: running ? "running · refreshing every " + TREE_REFRESH_MS / 1000 + " s" : "finished" }),
      el("span", { text: s.jobs + " jobs, " + s.levels + " levels" + (s.hidden ? ", " + s.hidden + " more below" : "") }),
      ...Object.entries(s.states).map(([state, n]) => badge(state, n)),
      el("button", { type: "button", text: "Expand all", onclick: () => { expandAll(answer.tree); redraw(); } }),
      el("button", { type: "button", text: "Collapse all", onclick: () => { view.expanded.clear(); redraw(); } }));
  }

  function expandAll(root) {
    const stack = [root];
    while (stack.length) {
      const node = stack.pop();
      if (node.children.length) view.expanded.add(node.id);
      stack.push(...node.children);
    }
  }

  function redraw() {
    if (view.tree) $("tree").replaceChildren(el("ul", { role: "group" }, drawNode(view.tree.tree, null)));
  }

  /** Children grouped by the operation that spawned them, with progress per operation. */
  function operationsOf(node) {
    const groups = new Map();
    for (const child of node.children) {
      const key = child.operation_id || "-";
      if (!groups.has(key)) groups.set(key, {});
      const counts = groups.get(key);
      counts[child.state] = (counts[child.state] || 0) + 1;
    }
    return [...groups.entries()].map(([operationId, counts]) => {
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      const done = Object.entries(counts).filter(([s]) => FINAL.has(s)).reduce((a, [, n]) => a + n, 0);
      const progress = { done, total, percent: total ? (100 * done / total) : null };
      const bar = progressBar(counts, progress, true);
      bar.setAttribute("data-operation-id", operationId);
      bar.title = "operation " + operationId;
      return bar;
    });
  }

  function drawNode(node, parent) {
    const hasChildren = node.children.length > 0;
    const open = hasChildren && view.expanded.has(node.id);
    const toggle = el("button", {
      class: "toggle" + (hasChildren ? "" : " leaf"), type: "button", "aria-expanded": hasChildren ? String(open) : null,
      title: hasChildren ? (open ? "Collapse" : "Expand") : null, text: open ? "▾" : "▸",
      onclick: () => {
        if (view.expanded.has(node.id)) view.expanded.delete(node.id); else view.expanded.add(node.id);
        redraw();
      },
    });
    const line = el("div", { class: "line" },
      toggle,
      badge(node.state),
      el("span", { class: "task", text: node.task_name }),
      el("span", { class: "id", title: node.id, text: node.id }),
      node.queue && (!parent || parent.queue !== node.queue) ? el("span", { class: "queue", text: "queue " + node.queue }) : null,
      hasChildren ? el("span", { class: "ops" }, operationsOf(node)) : null,
      hasChildren ? el("span", { class: "more", text: node.children.length + " children" }) : null,
      node.hidden_children
        ? el("button", { class: "link more", type: "button", "data-hidden": node.hidden_children,
                         text: "… " + node.hidden_children + " more below: open",
                         onclick: () => showTree(node.id) })
        : null);
    const item = el("li", { class: "node" + (node.id === view.jobId ? " current" : ""), role: "treeitem",
                            "data-job-id": node.id, "data-state": node.state, "data-depth": node.depth,
                            "aria-expanded": hasChildren ? String(open) : null }, line);
    if (open) {
      const limit = view.shown.get(node.id) || CHILDREN_PAGE;
      const list = el("ul", { role: "group" }, node.children.slice(0, limit).map((child) => drawNode(child, node)));
      if (node.children.length > limit) {
        list.append(el("li", { class: "more" }, el("button", {
          type: "button", text: "show " + Math.min(CHILDREN_PAGE, node.children.length - limit) + " more of "
            + (node.children.length - limit),
          onclick: () => { view.shown.set(node.id, limit + CHILDREN_PAGE); redraw(); } })));
      }
      item.append(list);
    }
    return item;
  }

  async function goUp() {
    if (!view.jobId) return;
    try {
      const answer = await api("jobs/" + encodeURIComponent(view.jobId) + "/parent");
      if (answer.parent) showTree(answer.parent.id);
    } catch (err) {
      message(err.message);
    }
  }

  // ---- refresh loop -----------------------------------------------------------------------------
  async function refreshLists() {
    clearTimeout(view.listTimer);
    try {
      await Promise.all([loadStats(), loadOperations()]);
    } catch (err) {
      if (err.status === 401) message("This server wants an API token: enter it above.");
      else message(err.message);
    } finally {
      view.listTimer = setTimeout(refreshLists, LIST_REFRESH_MS);
    }
  }

  function legend() {
    $("legend").replaceChildren("States: ", ...JOB_STATES.flatMap((state) => [badge(state), " "]));
  }

  function readToken() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    if (fragment.get("token")) {
      sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
      fragment.delete("token");
      const url = new URL(window.location.href);
      url.hash = fragment.toString();
      window.history.replaceState(null, "", url);
    }
    view.token = sessionStorage.getItem(TOKEN_KEY);
  }

  function start() {
    readToken();
    legend();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      view.token = $("token-input").value.trim() || null;
      if (view.token) sessionStorage.setItem(TOKEN_KEY, view.token); else sessionStorage.removeItem(TOKEN_KEY);
      $("token-form").hidden = true;
      message("");
      refreshLists();
      if (view.jobId) refreshTree();
    });
    $("operations-filter").addEventListener("change", refreshLists);
    $("operations-filter").addEventListener("submit", (event) => { event.preventDefault(); refreshLists(); });
    $("tree-form").addEventListener("submit", (event) => { event.preventDefault(); showTree($("job-input").value); });
    $("tree-up").addEventListener("click", goUp);
    refreshLists();
    const job = new URLSearchParams(window.location.search).get("job");
    if (job) showTree(job);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
