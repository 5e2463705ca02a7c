// The dashboard: projects, live sync progress, notifications, and reads of the mirror.
// Talks only to the public v1 API and to the socket through hivesync-client.js.

import { HiveSyncClient } from "./hivesync-client.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "hivesync.token";

const state = {
  token: null,
  projects: new Map(),
  selected: null,
  treePath: "",
  client: null,
  // the webhook secret just created: shown until hidden or another project is selected,
  // never fetched again (the server does not return it twice)
  reveal: null,
  // sync_id -> trigger, so replayed notifications do not ask twice
  triggers: new Map(),
};

function takeTokenFromUrl() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    localStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(TOKEN_KEY);
}

/** Bytes as the CLI shows them: B, KiB, MiB, GiB. */
function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(bytes ?? 0);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(2)} ${units[unit]}`;
}

/** A stage as people read it, the same in badges and headings. */
function stageLabel(stage) {
  return String(stage).replaceAll("_", " ");
}

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...(options.headers ?? {}) },
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body?.message ?? `request failed (${response.status})`);
    error.code = body?.error ?? "backend_error";
    error.status = response.status;
    throw error;
  }
  return body;
}

function reportError(error) {
  if (error.status === 401) {
    signOut(`Signed out: ${error.message}`);
    return;
  }
  showBanner(`${error.code ?? "error"}: ${error.message}`);
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

const shortCommit = (commit) => (commit ? commit.slice(0, 10) : "—");
const when = (at) => (at ? new Date(at).toLocaleString() : "never");
// a v1.1 hub says when the last *successful* sync was; an older one only when the last ended
const lastSuccess = (project) => ("last_success_at" in project ? project.last_success_at : project.last_synced_at);
const plural = (count, word) => `${count} ${word}${count === 1 ? "" : "s"}`;

function formatInterval(seconds) {
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

/** "3 commits, 12 files", "history rewritten", "first sync, 40 files", "no new commits". */
function describeChanges(changes) {
  if (!changes) return "";
  const parts = [];
  if (changes.commits === null || changes.commits === undefined) parts.push("first sync");
  else if (changes.commits === 0 && !changes.forced && changes.files_changed === 0) return "no new commits";
  else parts.push(changes.commits_capped ? `${changes.commits}+ commits` : plural(changes.commits, "commit"));
  parts.push(plural(changes.files_changed, "file"));
  return parts.join(", ");
}

const TRIGGERS = { api: "on request", webhook: "webhook push", schedule: "scheduled", repair: "repair" };
const triggerText = (trigger) => TRIGGERS[trigger] ?? trigger;

/** Puts `project` (a project response) in place of the one held, keeping its live state. */
function storeProject(project) {
  const held = state.projects.get(project.project_id);
  state.projects.set(project.project_id, { ...project, live: held?.live });
  renderProjects();
  if (project.project_id === state.selected) renderProjectHeader();
}

/** Notifications shown from the history when the page opens. */
const RECENT_NOTIFICATIONS = 50;

// ---- projects -------------------------------------------------------------

async function loadProjects() {
  const projects = await api("/api/v1/projects");
  state.projects = new Map(projects.map((project) => [project.project_id, { ...project, live: state.projects.get(project.project_id)?.live }]));
  renderProjects();
  if (state.selected && state.projects.has(state.selected)) renderProjectHeader();
}

function renderProjects() {
  const list = $("projects");
  list.replaceChildren();
  if (state.projects.size === 0) list.append(el("li", {}, el("span", { class: "hint" }, "No projects yet.")));
  for (const project of state.projects.values()) {
    const status = project.live?.stage ?? project.last_status ?? "never synced";
    list.append(
      el(
        "li",
        { "aria-current": project.project_id === state.selected ? "true" : "false", "data-project": project.project_id },
        el("div", { class: "row" },
          el("button", { class: "link", type: "button", onclick: () => selectProject(project.project_id) }, project.name),
          el("button", { type: "button", "aria-label": `Sync ${project.name}`, onclick: () => requestSync(project.project_id) }, "Sync")),
        el("div", { class: "row" },
          el("span", { class: "status", "data-status": status }, stageLabel(status)),
          el("span", { class: "meta" }, shortCommit(project.commit))),
        status === "failed" && project.last_error
          ? el("span", { class: "card-error", "data-error-code": project.last_error.code }, `${project.last_error.code}: ${project.last_error.message}`)
          : "",
        project.schedule?.paused
          ? el("span", { class: "card-error", "data-paused": "true" }, `scheduled syncs paused${project.schedule.paused_reason ? `: ${project.schedule.paused_reason}` : ""}`)
          : "",
        el("span", { class: "meta" }, `${project.branch} · synced ${when(lastSuccess(project))}`),
        el("div", { class: "row" },
          el("span", { class: "meta" }, scheduleSummary(project)),
          el("span", { class: "badges" },
            project.webhook ? el("span", { class: "status", "data-status": "webhook" }, "webhook") : "",
            project.schedule?.paused ? el("span", { class: "status", "data-status": "paused" }, "paused") : "",
            project.schedule?.paused
              ? el("button", { type: "button", class: "small", "aria-label": `Resume ${project.name}`, onclick: () => resumeProject(project.project_id) }, "Resume")
              : "")),
      ),
    );
  }
}

function scheduleSummary(project) {
  if (!project.sync_interval_s) return "on demand";
  const every = `every ${formatInterval(project.sync_interval_s)}`;
  if (project.schedule?.paused) return `${every} · paused`;
  const next = project.schedule?.next_sync_at;
  return next ? `${every} · next ${new Date(next).toLocaleTimeString()}` : every;
}

async function registerProject(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const project = await api("/api/v1/projects", {
      method: "POST",
      body: JSON.stringify({ name: form.get("name"), repo_url: form.get("repo_url"), branch: form.get("branch") }),
    });
    showFormError("register-error", "");
    event.target.reset();
    $("project-branch").value = "main";
    await loadProjects();
    selectProject(project.project_id);
  } catch (error) {
    if (error.status === 400 || error.status === 403) showFormError("register-error", error.message);
    else reportError(error);
  }
}

async function requestSync(projectId) {
  try {
    const accepted = await api("/api/v1/repo/sync", { method: "POST", body: JSON.stringify({ project_id: projectId }) });
    showBanner("");
    const project = state.projects.get(projectId);
    if (project && !project.live) project.live = { stage: accepted.status, percent: 0, sync_id: accepted.sync_id };
    renderProjects();
    if (projectId === state.selected) renderProgress();
  } catch (error) {
    reportError(error);
  }
}

// ---- the selected project ---------------------------------------------------

function selectProject(projectId) {
  if (state.reveal?.projectId !== projectId) state.reveal = null;
  state.selected = projectId;
  state.treePath = "";
  $("project-view").hidden = false;
  $("empty-hint").hidden = true;
  showFile(null);
  $("search-input").value = "";
  $("search-regex").checked = false;
  $("search-results").replaceChildren();
  $("interval-error").hidden = true;
  renderProjects();
  renderProjectHeader();
  fillIntervalForm(state.projects.get(projectId));
  refreshSelected();
}

function renderProjectHeader() {
  const project = state.projects.get(state.selected);
  if (!project) return;
  $("project-title").textContent = project.name;
  $("project-meta").textContent = `${project.repo_url} · ${project.branch} · commit ${shortCommit(project.commit)} · synced ${when(lastSuccess(project))}`;
  renderProgress();
  renderFreshness(project);
  renderWebhook(project);
}

// ---- keeping the mirror fresh: schedule, pause, last outcomes, webhook -------

function renderFreshness(project) {
  const schedule = project.schedule ?? {};
  let text;
  if (!project.sync_interval_s) text = "On demand only: the Sync button or a webhook push.";
  else if (schedule.paused) text = `Every ${formatInterval(project.sync_interval_s)} · scheduled syncs paused.`;
  else if (schedule.next_sync_at) text = `Every ${formatInterval(project.sync_interval_s)} · next sync ${when(schedule.next_sync_at)}.`;
  else text = `Every ${formatInterval(project.sync_interval_s)}.`;
  $("schedule-text").textContent = text;
  $("schedule-text").dataset.interval = project.sync_interval_s ?? "";

  const paused = Boolean(schedule.paused);
  $("paused-block").hidden = !paused;
  $("paused-block").dataset.paused = String(paused);
  $("paused-text").textContent = paused
    ? `Paused after ${plural(schedule.consecutive_failures ?? 0, "failed sync")}${schedule.paused_reason ? ` (${schedule.paused_reason})` : ""}. On-demand and webhook syncs still run.`
    : "";
  $("interval-clear").disabled = !project.sync_interval_s;

  $("last-success").textContent = when(project.last_success_at);
  $("last-attempt").textContent = when(project.last_attempt_at);
  const error = project.last_error;
  $("last-error").textContent = error ? `${error.code}: ${error.message} (${when(error.at)})` : "none";
  $("last-error").classList.toggle("bad", Boolean(error));
}

/** The interval form shows the project's interval in the largest unit that divides it. */
function fillIntervalForm(project) {
  const seconds = project?.sync_interval_s;
  if (!seconds) {
    $("interval-value").value = "";
    $("interval-unit").value = "60";
    return;
  }
  const unit = seconds % 3600 === 0 ? 3600 : seconds % 60 === 0 ? 60 : 1;
  $("interval-value").value = String(seconds / unit);
  $("interval-unit").value = String(unit);
}

async function patchProject(projectId, change) {
  try {
    const project = await api(`/api/v1/projects/${encodeURIComponent(projectId)}`, { method: "PATCH", body: JSON.stringify(change) });
    showFormError("interval-error", "");
    storeProject(project);
    if (projectId === state.selected) fillIntervalForm(project);
  } catch (error) {
    if (error.status === 400) showFormError("interval-error", error.message);
    else reportError(error);
  }
}

/** A refusal shown where it was typed, not in the banner. */
function showFormError(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

function saveInterval(event) {
  event.preventDefault();
  if (!state.selected) return;
  const value = Number($("interval-value").value);
  if (!Number.isInteger(value) || value < 1) {
    showFormError("interval-error", "The interval must be a whole number above zero.");
    return;
  }
  patchProject(state.selected, { sync_interval_s: value * Number($("interval-unit").value) });
}

async function resumeProject(projectId) {
  try {
    const project = await api(`/api/v1/projects/${encodeURIComponent(projectId)}/resume`, { method: "POST" });
    showBanner("");
    storeProject(project);
  } catch (error) {
    reportError(error);
  }
}

function renderWebhook(project) {
  const on = Boolean(project.webhook);
  $("webhook-status").textContent = on
    ? "On: pushes to the tracked branch start a sync. The secret was shown once when it was created."
    : "Off. Turn it on to sync on every push from GitHub, GitLab or Gitea/Forgejo.";
  $("webhook-status").dataset.on = String(on);
  $("webhook-create").textContent = on ? "Rotate secret" : "Turn on webhook";
  $("webhook-delete").hidden = !on;
  const reveal = state.reveal?.projectId === project.project_id ? state.reveal : null;
  $("webhook-reveal").hidden = !reveal;
  $("webhook-url").textContent = reveal?.url ?? "";
  $("webhook-secret").textContent = reveal?.secret ?? "";
}

async function createWebhook() {
  const projectId = state.selected;
  const project = state.projects.get(projectId);
  if (!project) return;
  if (project.webhook && !confirm("Rotate the webhook secret? Deliveries signed with the old one will be refused until you update your forge.")) return;
  try {
    const created = await api(`/api/v1/projects/${encodeURIComponent(projectId)}/webhook`, { method: "POST" });
    showBanner("");
    state.reveal = { projectId, url: new URL(created.url, location.origin).toString(), secret: created.secret };
    project.webhook = true;
    renderProjects();
    if (projectId === state.selected) renderProjectHeader();
  } catch (error) {
    reportError(error);
  }
}

async function deleteWebhook() {
  const projectId = state.selected;
  const project = state.projects.get(projectId);
  if (!project) return;
  if (!confirm("Turn webhooks off? Deliveries will be refused; turning them on again makes a new secret.")) return;
  try {
    await api(`/api/v1/projects/${encodeURIComponent(projectId)}/webhook`, { method: "DELETE" });
    showBanner("");
    if (state.reveal?.projectId === projectId) state.reveal = null;
    project.webhook = false;
    renderProjects();
    if (projectId === state.selected) renderProjectHeader();
  } catch (error) {
    reportError(error);
  }
}

function hideSecret() {
  state.reveal = null;
  const project = state.projects.get(state.selected);
  if (project) renderWebhook(project);
}

function renderProgress() {
  const project = state.projects.get(state.selected);
  if (!project) return;
  const live = project.live;
  const stage = live?.stage ?? project.last_status ?? "idle";
  // a failed sync's bar is full and red: it ended, it did not stop at 0 %
  const ended = ["completed", "failed"].includes(live?.stage ?? project.last_status);
  const percent = ended ? 100 : live?.percent ?? 0;
  $("stage-text").textContent = stageLabel(stage);
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress").dataset.status = stage;
  $("progress-fill").style.width = `${percent}%`;
  $("progress-detail").textContent = live?.objects !== undefined ? `${live.objects} objects · ${formatBytes(live.bytes)}` : "";
  $("sync-button").disabled = Boolean(live && !["completed", "failed"].includes(live.stage));
}

async function refreshSelected() {
  if (!state.selected) return;
  await Promise.all([loadHistory(), loadTree(state.treePath)]);
}

async function loadHistory() {
  const projectId = state.selected;
  try {
    const syncs = await api(`/api/v1/repo/sync?project_id=${projectId}&limit=20`);
    if (projectId !== state.selected) return;
    $("history").replaceChildren(
      ...syncs.map((sync) =>
        el("tr", {},
          el("td", {}, when(sync.queued_at)),
          el("td", {}, triggerText(sync.trigger ?? "api")),
          el("td", {}, el("span", { class: "status", "data-status": sync.status }, sync.status)),
          el("td", {}, el("code", {}, shortCommit(sync.commit))),
          el("td", {}, [describeChanges(sync.changes), sync.changes?.forced ? "history rewritten" : ""].filter(Boolean).join(" · ")),
          el("td", {}, sync.duration_ms !== null ? `${sync.duration_ms} ms` : "—"),
          el("td", {}, sync.error ? `${sync.error.code}: ${sync.error.message}` : "")),
      ),
    );
  } catch (error) {
    reportError(error);
  }
}

async function loadTree(path) {
  const projectId = state.selected;
  const project = state.projects.get(projectId);
  if (!project?.commit) {
    $("tree").replaceChildren(el("li", { class: "hint" }, "Not synced yet."));
    return;
  }
  try {
    const base = `/api/v1/repo/tree?project_id=${projectId}&path=${encodeURIComponent(path)}`;
    const tree = await api(base);
    if (projectId !== state.selected) return;
    state.treePath = tree.path;
    $("tree-path").textContent = tree.path ? `/${tree.path}` : "/";
    const items = [];
    if (tree.path) {
      const parent = tree.path.split("/").slice(0, -1).join("/");
      items.push(el("li", {}, el("button", { class: "link", type: "button", onclick: () => loadTree(parent) }, "..")));
    }
    items.push(...treeItems(tree.entries));
    if (tree.next_cursor) items.push(moreEntries(base, tree.next_cursor, projectId));
    $("tree").replaceChildren(...items);
  } catch (error) {
    reportError(error);
  }
}

// One page's entries, directories first (pages come in path order).
function treeItems(entries) {
  const sorted = [...entries].sort((a, b) => (a.kind !== "dir") - (b.kind !== "dir"));
  return sorted.map((entry) => {
    const label = entry.kind === "dir" ? `${entry.name}/` : entry.name;
    const open = entry.kind === "dir" ? () => loadTree(entry.path) : entry.kind === "file" ? () => openFile(entry.path) : null;
    return el("li", {}, open ? el("button", { class: "link", type: "button", onclick: open, "data-path": entry.path }, label) : el("span", { class: "meta" }, `${label} (submodule)`));
  });
}

// A button that appends the directory's next page in its place.
function moreEntries(base, cursor, projectId) {
  const item = el("li", {});
  const button = el("button", { class: "link", type: "button", "data-more": "1" }, "More entries…");
  button.addEventListener("click", async () => {
    try {
      const page = await api(`${base}&cursor=${encodeURIComponent(cursor)}`);
      if (projectId !== state.selected) return;
      const next = page.next_cursor ? [moreEntries(base, page.next_cursor, projectId)] : [];
      item.replaceWith(...treeItems(page.entries), ...next);
    } catch (error) {
      reportError(error);
    }
  });
  item.append(button);
  return item;
}

/** Shows the file box (hidden, with a hint, until a file is chosen). */
function showFile(title) {
  $("file-title").textContent = title ?? "File";
  $("file-view").hidden = title === null;
  $("file-hint").hidden = title !== null;
  if (title === null) $("file-view").textContent = "";
}

async function openFile(path, line = null) {
  try {
    const file = await api(`/api/v1/repo/file?project_id=${state.selected}&path=${encodeURIComponent(path)}`);
    showFile(`${file.path}${file.truncated ? " (first 1 MiB)" : ""}`);
    const view = $("file-view");
    // the tree shows the file's folder, wherever the file was opened from
    const folder = file.path.split("/").slice(0, -1).join("/");
    if (folder !== state.treePath) loadTree(folder);
    if (file.encoding !== "utf-8") {
      view.textContent = `Binary file, ${formatBytes(file.size)}.`;
      return;
    }
    // a highlighted line is a block, so it carries no newline of its own
    view.replaceChildren(
      ...file.content.split("\n").map((text, index) =>
        index + 1 === line
          ? el("span", { class: "hl", "data-line": index + 1 }, text)
          : el("span", { "data-line": index + 1 }, `${text}\n`)),
    );
    if (line) view.querySelector(`[data-line="${line}"]`)?.scrollIntoView({ block: "center" });
  } catch (error) {
    reportError(error);
  }
}

async function search(event) {
  event.preventDefault();
  const q = $("search-input").value;
  const regex = $("search-regex").checked;
  try {
    const found = await api(`/api/v1/repo/search?project_id=${state.selected}&q=${encodeURIComponent(q)}&regex=${regex}&limit=200`);
    const items = found.matches.map((match) =>
      el("li", {},
        el("button", { class: "link", type: "button", onclick: () => openFile(match.path, match.line) }, `${match.path}:${match.line}`),
        " ",
        el("code", {}, match.text.trim())));
    if (found.truncated) items.push(el("li", { class: "hint" }, "More matches not shown."));
    if (!items.length) items.push(el("li", { class: "hint" }, "No matches."));
    $("search-results").replaceChildren(...items);
  } catch (error) {
    reportError(error);
  }
}

// ---- live events ------------------------------------------------------------

function onEvent(frame) {
  const project = state.projects.get(frame.project_id);
  if (frame.type === "sync.stage") {
    if (!project) {
      // a project registered elsewhere (another tab, the API): pick it up
      if (frame.stage === "queued") loadProjects().catch(reportError);
      return;
    }
    project.live = {
      stage: frame.stage,
      sync_id: frame.sync_id,
      percent: frame.progress?.percent ?? (frame.stage === "queued" ? 0 : project.live?.percent ?? 0),
      objects: frame.progress?.objects,
      bytes: frame.progress?.bytes,
    };
    renderProjects();
    if (frame.project_id === state.selected) renderProgress();
    if (frame.stage === "completed" || frame.stage === "failed") {
      loadProjects().then(() => frame.project_id === state.selected && refreshSelected()).catch(reportError);
    }
  } else if (frame.type === "notification") {
    renderNotification(frame);
    if (frame.kind === "repo_sync_paused") loadProjects().catch(reportError);
  }
}

/** One notification at the top of the panel (live, or from the history on start). */
function renderNotification(frame) {
  const project = state.projects.get(frame.project_id);
  const name = project?.name ?? frame.project_id;
  const text =
    frame.kind === "repo_sync_success" ? `${name}: synced to ${shortCommit(frame.commit)}`
    : frame.kind === "repo_sync_failed" ? `${name}: sync failed — ${frame.error?.code}: ${frame.error?.message}`
    : frame.kind === "repo_sync_paused" ? `${name}: scheduled syncs paused after repeated failures${frame.error ? ` — ${frame.error.code}` : ""}`
    : `${name}: mirror repaired`;
  const item = el("li", { "data-kind": frame.kind, "data-project": frame.project_id, "data-sync": frame.sync_id },
    el("strong", {}, frame.kind.replaceAll("_", " ")), el("br"), text);
  if (frame.kind === "repo_sync_success" && frame.changes) {
    item.append(el("br"), el("span", { class: "changes" }, describeChanges(frame.changes)));
    if (frame.changes.forced) item.append(" · ", el("span", { class: "forced" }, "history rewritten"));
  }
  const trigger = el("span", { class: "trigger" });
  item.append(el("br"), el("span", { class: "meta" }, when(frame.at), trigger));
  $("notifications").prepend(item);
  if (frame.sync_id && frame.kind !== "repo_sync_paused") showTrigger(trigger, frame);
}

/** Notifications kept for this user, so a page opened after syncs ended shows what
 * happened; returns the last event id seen, where the live stream takes over. */
async function loadRecentNotifications() {
  const events = await api("/api/v1/notifications?after=0&limit=10000");
  $("notifications").replaceChildren();
  for (const frame of events.filter((event) => event.type === "notification").slice(-RECENT_NOTIFICATIONS)) {
    renderNotification(frame);
  }
  return events.length ? events[events.length - 1].id : null;
}

/** Notifications do not carry the trigger; the sync record does. */
async function showTrigger(node, frame) {
  let trigger = frame.trigger ?? state.triggers.get(frame.sync_id);
  if (!trigger) {
    try {
      trigger = (await api(`/api/v1/repo/sync/${encodeURIComponent(frame.sync_id)}`)).trigger;
    } catch {
      return; // the record is gone or the hub is away: the notification stands without it
    }
  }
  if (!trigger) return;
  state.triggers.set(frame.sync_id, trigger);
  node.dataset.trigger = trigger;
  node.textContent = ` · ${triggerText(trigger)}`;
}

function startLive(lastEventId = null) {
  state.client?.stop();
  const client = new HiveSyncClient({ token: state.token });
  // the stream resumes after what the history showed: nothing twice, nothing missed
  if (lastEventId !== null) client.lastEventId = lastEventId;
  client.addEventListener("event", (event) => onEvent(event.detail));
  client.addEventListener("state", (event) => {
    $("connection").dataset.state = event.detail;
    $("connection-text").textContent = event.detail === "offline" ? "offline — retrying" : event.detail;
  });
  client.addEventListener("resync", () => loadProjects().then(refreshSelected).catch(reportError));
  client.start();
  state.client = client;
}

// ---- sign-in ----------------------------------------------------------------

function signOut(message = "") {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.client?.stop();
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  showBanner(message);
}

async function signIn(token) {
  state.token = token;
  try {
    await loadProjects();
  } catch (error) {
    signOut(`Could not sign in: ${error.message}`);
    return;
  }
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  showBanner("");
  let lastEventId = null;
  try {
    lastEventId = await loadRecentNotifications();
  } catch (error) {
    reportError(error);
  }
  startLive(lastEventId);
}

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  localStorage.setItem(TOKEN_KEY, token);
  signIn(token);
});
$("sign-out").addEventListener("click", () => signOut());
$("register-form").addEventListener("submit", registerProject);
$("sync-button").addEventListener("click", () => state.selected && requestSync(state.selected));
$("search-form").addEventListener("submit", search);
$("interval-form").addEventListener("submit", saveInterval);
$("interval-clear").addEventListener("click", () => state.selected && patchProject(state.selected, { sync_interval_s: null }));
$("resume-button").addEventListener("click", () => state.selected && resumeProject(state.selected));
$("webhook-create").addEventListener("click", createWebhook);
$("webhook-delete").addEventListener("click", deleteWebhook);
$("webhook-hide").addEventListener("click", hideSecret);

const token = takeTokenFromUrl();
if (token) signIn(token);
else signOut();
