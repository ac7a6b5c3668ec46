// This session's outputs, newest first, with how each was made and its permanent URL.
// Kept in sessionStorage, so a reload keeps them and a new tab starts empty.

import { describe } from "./controls.js";

const STORAGE = "kiln.history";
const $ = (id) => document.getElementById(id);

export class History {
  /** ``onShow(entry)`` puts an entry back on the stage; ``onSeed(seed)`` reuses its seed. */
  constructor({ onShow, onSeed }) {
    this.onShow = onShow;
    this.onSeed = onSeed;
    try {
      this.entries = JSON.parse(sessionStorage.getItem(STORAGE) || "[]");
    } catch {
      this.entries = [];
    }
    for (const entry of [...this.entries].reverse()) $("history").prepend(this.render(entry));
  }

  /** Add an output: {output, fields, seed, ms, via} (via: "websocket" or the job id). */
  add(entry) {
    this.entries.unshift(entry);
    sessionStorage.setItem(STORAGE, JSON.stringify(this.entries.slice(0, 200)));
    $("history").prepend(this.render(entry));
  }

  render(entry) {
    const li = document.createElement("li");
    li.className = "item";
    li.dataset.output = entry.output;
    const thumb = document.createElement("button");
    thumb.type = "button";
    thumb.className = "thumb";
    thumb.title = "show";
    const media = isVideo(entry.output) ? document.createElement("video") : document.createElement("img");
    media.src = entry.output;
    if (media.tagName === "IMG") {
      media.alt = entry.fields.prompt;
      media.loading = "lazy";
    } else {
      media.muted = true;
    }
    thumb.append(media);
    thumb.addEventListener("click", () => this.onShow(entry));

    const text = document.createElement("div");
    const prompt = document.createElement("p");
    prompt.className = "prompt";
    prompt.textContent = entry.fields.prompt || "(no prompt)";
    const meta = document.createElement("p");
    meta.className = "meta";
    const timing = entry.ms !== undefined && entry.ms !== null ? ` · ${entry.ms} ms` : "";
    meta.textContent = `${describe(entry.fields)} · seed ${entry.seed}${timing} · ${entry.via}`;
    const link = document.createElement("a");
    Object.assign(link, { href: entry.output, target: "_blank", rel: "noopener", className: "url",
      textContent: entry.output });
    const seed = document.createElement("button");
    Object.assign(seed, { type: "button", className: "link", textContent: "use seed" });
    seed.addEventListener("click", () => this.onSeed(entry.seed));
    const copy = document.createElement("button");
    Object.assign(copy, { type: "button", className: "link", textContent: "copy URL" });
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(entry.output);
        copy.textContent = "copied";
      } catch {
        copy.textContent = "select the URL to copy it"; // no clipboard outside a secure context
      }
    });
    const tools = document.createElement("p");
    tools.className = "tools";
    tools.append(link, " ", copy, " ", seed);
    text.append(prompt, meta, tools);
    li.append(thumb, text);
    return li;
  }
}

export function isVideo(url) {
  return /\.mp4(\?|$)/.test(url) || /\/v\/[^/]+$/.test(url);
}
