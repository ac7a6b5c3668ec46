// Generations over the API's WebSocket (/ws): one connection, several generations, step previews.
//
// Protocol (kiln/api/routes/ws.py): {"type":"auth","token"} first when the server wants keys,
// then {"type":"generate","id",…,"stream_frames":true}; the server answers frame {id, step,
// total_steps, data: base64 WebP}, complete {id, output, latency_ms, seed} or error {id?, error,
// message}; {"type":"cancel","id"} stops a generation between steps (error code "cancelled").

import { ApiError, auth } from "./api.js";

export class Live {
  constructor() {
    this.opening = null;
    this.pending = new Map(); // generation id -> {resolve, reject, onFrame}
    this.counter = 0;
    this.closeReason = null;
  }

  /** The open socket (connecting and authenticating first when there is none). */
  connect() {
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const socket = new WebSocket(`${scheme}://${location.host}/ws`);
      let opened = false;
      this.closeReason = null;
      socket.addEventListener("open", () => {
        opened = true;
        if (auth.required !== false) socket.send(JSON.stringify({ type: "auth", token: auth.key }));
        resolve(socket);
      });
      socket.addEventListener("message", (event) => this.dispatch(event.data));
      socket.addEventListener("close", (event) => {
        this.opening = null;
        const reason = this.closeReason
          || new ApiError(0, "connection_closed", `the WebSocket closed (code ${event.code})`);
        for (const waiter of this.pending.values()) waiter.reject(reason);
        this.pending.clear();
        if (!opened) reject(reason);
      });
    });
    return this.opening;
  }

  /**
   * Start a generation of ``fields`` (the render API's generate message without type and id).
   * ``onFrame(frame)`` gets each step preview; the promise resolves to the complete message.
   */
  async generate(fields, onFrame) {
    const socket = await this.connect();
    const id = `g_${Date.now().toString(36)}_${++this.counter}`;
    const done = new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onFrame });
    });
    socket.send(JSON.stringify({ type: "generate", id, stream_frames: true, ...fields }));
    return { id, done };
  }

  /** Ask the server to stop generation ``id`` (it answers with an error whose code is "cancelled"). */
  async cancel(id) {
    const socket = await this.connect();
    socket.send(JSON.stringify({ type: "cancel", id }));
  }

  dispatch(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    const waiter = message.id !== undefined ? this.pending.get(message.id) : undefined;
    if (message.type === "error") {
      const err = new ApiError(0, message.error, message.message, message);
      if (waiter) {
        this.pending.delete(message.id);
        waiter.reject(err);
      } else {
        this.closeReason = err; // an error for the connection (its key): the server closes it next
      }
    } else if (!waiter) {
      // a late message for a generation this page stopped waiting for
    } else if (message.type === "frame") {
      waiter.onFrame(message);
    } else if (message.type === "complete") {
      this.pending.delete(message.id);
      waiter.resolve(message);
    }
  }
}
