// HiveSync live-events client: one small module an IDE plugin can reuse as is.
//
//   import { HiveSyncClient } from "./hivesync-client.js";
//   const client = new HiveSyncClient({ baseUrl: "http://127.0.0.1:8080", token });
//   client.addEventListener("event", (e) => console.log(e.detail));   // sync.stage / notification
//   client.addEventListener("state", (e) => console.log(e.detail));   // connecting | live | reconnecting | polling | offline | closed
//   client.addEventListener("resync", () => reloadEverything());      // history was too old to replay
//   client.start();
//
// It connects to /api/v1/ws, resumes with ?last_event_id= after any drop (so no event
// is lost or repeated), reconnects with exponential backoff and jitter, and falls back
// to polling /api/v1/notifications while the socket cannot be opened.

export class HiveSyncClient extends EventTarget {
  #baseUrl;
  #token;
  #projectIds;
  #socket = null;
  #state = "idle";
  #attempts = 0;
  #everOpened = false;
  #stopped = true;
  #reconnectTimer = null;
  #pollTimer = null;
  #options;

  /** The id of the newest event delivered; the resume point after a drop. */
  lastEventId;

  constructor({
    baseUrl = globalThis.location?.origin,
    token,
    lastEventId = null,
    projectIds = null,
    maxBackoffMs = 10_000,
    pollIntervalMs = 2_000,
    pollAfterFailures = 3,
    WebSocketImpl = globalThis.WebSocket,
    fetchImpl = globalThis.fetch?.bind(globalThis),
  } = {}) {
    super();
    this.#baseUrl = baseUrl.replace(/\/$/, "");
    this.#token = token;
    this.#projectIds = projectIds;
    this.lastEventId = lastEventId;
    this.#options = { maxBackoffMs, pollIntervalMs, pollAfterFailures, WebSocketImpl, fetchImpl };
  }

  get state() {
    return this.#state;
  }

  start() {
    this.#stopped = false;
    if (!this.#options.WebSocketImpl) {
      this.#startPolling();
      return;
    }
    this.#connect();
  }

  stop() {
    this.#stopped = true;
    clearTimeout(this.#reconnectTimer);
    this.#stopPolling();
    this.#socket?.close(1000, "client stopped");
    this.#socket = null;
    this.#setState("closed");
  }

  /** Narrows the stream to these projects (null or [] for all of the user's). */
  subscribe(projectIds) {
    this.#projectIds = projectIds;
    if (this.#socket?.readyState === 1 && projectIds?.length) {
      this.#socket.send(JSON.stringify({ type: "subscribe", project_ids: projectIds }));
    }
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  #socketUrl() {
    const url = new URL("/api/v1/ws", this.#baseUrl);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("access_token", this.#token);
    if (this.lastEventId !== null && this.lastEventId !== undefined) {
      url.searchParams.set("last_event_id", String(this.lastEventId));
    }
    return url.toString();
  }

  #connect() {
    if (this.#stopped) return;
    this.#setState(this.#attempts === 0 && !this.#everOpened ? "connecting" : ["polling", "offline"].includes(this.#state) ? this.#state : "reconnecting");
    let socket;
    try {
      socket = new this.#options.WebSocketImpl(this.#socketUrl());
    } catch {
      this.#scheduleReconnect();
      return;
    }
    this.#socket = socket;
    socket.onopen = () => {
      this.#attempts = 0;
      this.#everOpened = true;
      this.#stopPolling();
      this.#setState("live");
      if (this.#projectIds?.length) {
        socket.send(JSON.stringify({ type: "subscribe", project_ids: this.#projectIds }));
      }
    };
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      this.#handle(frame);
    };
    socket.onclose = (close) => {
      if (this.#socket !== socket) return;
      this.#socket = null;
      if (this.#stopped) return;
      // 4008: we fell behind; resume at once from the last id we got
      if (close.code === 4008) {
        this.#connect();
        return;
      }
      this.#scheduleReconnect();
    };
    socket.onerror = () => {
      // onclose follows and decides what to do
    };
  }

  #scheduleReconnect() {
    this.#attempts += 1;
    if (this.#attempts >= this.#options.pollAfterFailures) {
      this.#startPolling();
    } else {
      this.#setState("reconnecting");
    }
    const exponential = Math.min(this.#options.maxBackoffMs, 250 * 2 ** this.#attempts);
    const delay = exponential / 2 + Math.random() * (exponential / 2);
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  #handle(frame) {
    switch (frame.type) {
      case "hello":
        if (this.lastEventId === null || this.lastEventId === undefined || frame.last_event_id > this.lastEventId) {
          this.lastEventId = frame.last_event_id;
        }
        return;
      case "resync_required":
        this.dispatchEvent(new CustomEvent("resync"));
        return;
      case "pong":
      case "error":
        return;
      default:
        if (typeof frame.id !== "number") return;
        if (this.lastEventId !== null && this.lastEventId !== undefined && frame.id <= this.lastEventId) return;
        this.lastEventId = frame.id;
        this.dispatchEvent(new CustomEvent("event", { detail: frame }));
    }
  }

  #startPolling() {
    if (this.#pollTimer || this.#stopped) return;
    this.#setState("polling");
    const poll = async () => {
      try {
        const after = this.lastEventId ?? 0;
        const response = await this.#options.fetchImpl(
          `${this.#baseUrl}/api/v1/notifications?after=${after}&limit=500`,
          { headers: { Authorization: `Bearer ${this.#token}` } },
        );
        if (response.ok) {
          this.#setState("polling");
          for (const frame of await response.json()) this.#handle(frame);
        } else if (response.status >= 500) {
          this.#setState("offline");
        }
      } catch {
        // the server is unreachable too: say so, and keep trying
        this.#setState("offline");
      }
      if (this.#pollTimer) this.#pollTimer = setTimeout(poll, this.#options.pollIntervalMs);
    };
    this.#pollTimer = setTimeout(poll, 0);
  }

  #stopPolling() {
    clearTimeout(this.#pollTimer);
    this.#pollTimer = null;
  }
}
