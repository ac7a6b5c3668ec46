// The render API as the page uses it: fetch with the stored key, errors as ApiError, job events.
//
// The key lives in localStorage under KEY_STORAGE. A call that answers 401 asks for a key (the
// page registers the asking function with onKeyNeeded) and is sent again with it.
//
// GET /jobs/{id}/events is read with fetch, not EventSource: EventSource cannot send the
// Authorization header the API authenticates with.

const KEY_STORAGE = "kiln.apiKey";

export class ApiError extends Error {
  /** An error body of the render API ({error, message, retry_after?, details?}) with its status. */
  constructor(status, code, message, body = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

export const auth = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  // null until the first call says; false when the server runs without keys (--no-auth)
  required: null,
};

let askForKey = async () => {
  throw new ApiError(401, "invalid_token", "this server needs an API key");
};

/** Register the page's way of asking the user for a key: (message) => Promise<string>. */
export function onKeyNeeded(ask) {
  askForKey = ask;
}

export function saveKey(key) {
  auth.key = key.trim();
  localStorage.setItem(KEY_STORAGE, auth.key);
}

export function forgetKey() {
  auth.key = "";
  localStorage.removeItem(KEY_STORAGE);
}

let asking = null;

/** A new key from the user, after ``message`` (why the last one did not do); calls that get a 401
 * together share one question. */
export function renewKey(message) {
  if (!asking) {
    asking = askForKey(message)
      .then((key) => {
        saveKey(key);
        return auth.key;
      })
      .finally(() => {
        asking = null;
      });
  }
  return asking;
}

export function authHeaders() {
  return auth.required !== false && auth.key ? { Authorization: `Bearer ${auth.key}` } : {};
}

async function errorOf(res) {
  let body = {};
  try {
    body = await res.json();
  } catch {
    // not JSON (a proxy's page): the status line is all there is
  }
  const code = typeof body.error === "string" ? body.error : `http_${res.status}`;
  const message = typeof body.message === "string" ? body.message : `${res.status} ${res.statusText}`;
  return new ApiError(res.status, code, message, body);
}

/**
 * Call the API: ``json`` or ``form`` (FormData) is the body; resolves to the parsed JSON.
 * On 401 the user is asked for a key and the call is made again; other errors throw ApiError.
 */
export async function call(method, path, { json, form, signal } = {}) {
  for (;;) {
    const headers = authHeaders();
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, signal, cache: "no-store" });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, "network_error", `could not reach the server (${exc.message})`);
    }
    if (res.status === 401) {
      const err = await errorOf(res);
      auth.required = true;
      await renewKey(auth.key ? err.message : "This server needs an API key.");
      continue;
    }
    if (!res.ok) throw await errorOf(res);
    return res.status === 204 ? null : res.json();
  }
}

/**
 * Learn whether the server wants keys: GET /models without one answers 401 when it does.
 * Resolves to the /models body (fetched with the key where one is needed).
 */
export async function loadModels() {
  let res;
  try {
    res = await fetch("/models", { cache: "no-store" });
  } catch (exc) {
    throw new ApiError(0, "network_error", `could not reach the server (${exc.message})`);
  }
  if (res.ok) {
    auth.required = false;
    return res.json();
  }
  if (res.status !== 401) throw await errorOf(res);
  auth.required = true;
  if (!auth.key) await renewKey("This server needs an API key.");
  return call("GET", "/models");
}

/**
 * Follow a job's Server-Sent Events until its terminal event, calling ``onEvent(name, data)``
 * for each. A dropped stream is resumed with Last-Event-ID (the API replays what was missed).
 */
export async function followEvents(jobId, onEvent, { signal, retries = 5 } = {}) {
  let lastId = null;
  let failures = 0;
  for (;;) {
    const headers = { ...authHeaders(), Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let res;
    try {
      res = await fetch(`/jobs/${encodeURIComponent(jobId)}/events`, { headers, signal, cache: "no-store" });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      res = null;
    }
    if (res && res.status === 401) {
      const err = await errorOf(res);
      await renewKey(err.message);
      continue;
    }
    if (res && !res.ok) throw await errorOf(res);
    if (res) {
      const ended = await readStream(res, (id, name, data) => {
        if (id !== null && name !== "position") lastId = id;
        failures = 0;
        onEvent(name, data);
      });
      if (ended) return;
    }
    failures += 1;
    if (failures > retries) {
      throw new ApiError(0, "network_error", `lost the event stream of ${jobId}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 250 * 2 ** failures)); // back off
  }
}

const TERMINAL = new Set(["complete", "failed", "cancelled"]);

/** Parse one text/event-stream body; true when a terminal event was read. */
async function readStream(res, emit) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let terminal = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = { id: null, name: "message", data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") event.id = text;
          else if (field === "event") event.name = text;
          else if (field === "data") event.data.push(text);
        }
        if (!event.data.length) continue;
        emit(event.id, event.name, JSON.parse(event.data.join("\n")));
        if (TERMINAL.has(event.name)) terminal = true;
      }
    }
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    return terminal; // a dropped connection: resumed by the caller
  }
  return terminal;
}
