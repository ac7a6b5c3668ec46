// The async tier: POST /queue, follow each job's events (position, progress, the end), cancel it
// with DELETE /jobs/{id}.

import { call, followEvents } from "./api.js";
import { describe } from "./controls.js";

const $ = (id) => document.getElementById(id);

export class Queue {
  /** ``onComplete(entry)`` gets a finished job's output for the history; ``onError(err)`` shows one. */
  constructor({ onComplete, onError }) {
    this.onComplete = onComplete;
    this.onError = onError;
  }

  /** Queue ``fields`` (a render-API /queue body); resolves to the 202 answer. */
  async submit(fields) {
    const job = await call("POST", "/queue", { json: fields });
    const li = this.render(job, fields);
    $("jobs").prepend(li);
    $("queue-empty").hidden = true;
    this.show(li, job);
    this.follow(job.id, li, fields);
    return job;
  }

  render(job, fields) {
    const li = document.createElement("li");
    li.className = "job";
    li.dataset.jobId = job.id;
    li.title = describe(fields);
    const what = document.createElement("p");
    what.className = "what";
    what.textContent = fields.prompt;
    const head = document.createElement("p");
    const id = document.createElement("code");
    id.textContent = job.id;
    const state = document.createElement("span");
    state.className = "state";
    head.append(id, " ", state);
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = 0;
    const cancel = document.createElement("button");
    Object.assign(cancel, { type: "button", className: "secondary cancel", textContent: "Cancel" });
    cancel.addEventListener("click", () => this.cancel(job.id, li));
    li.append(what, cancel, head, bar);
    return li;
  }

  /** Put a job's state (a GET /jobs body or what its events said) on its row. */
  show(li, job) {
    li.dataset.status = job.status;
    const eta = job.eta_seconds !== undefined && job.eta_seconds !== null ? ` · about ${job.eta_seconds} s` : "";
    const text = {
      queued: `queued · #${job.position} in line${eta}`,
      running: job.step ? `running · step ${job.step}/${job.total_steps}${eta}` : "running",
      complete: "complete",
      failed: `failed: ${job.error ? job.error.message : ""}`,
      cancelled: "cancelled",
    }[job.status] || job.status;
    li.querySelector(".state").textContent = text;
    const bar = li.querySelector("progress");
    bar.value = job.status === "complete" ? 1 : job.progress || 0;
    bar.hidden = job.status !== "running";
    if (["complete", "failed", "cancelled"].includes(job.status)) li.querySelector(".cancel")?.remove();
  }

  async follow(jobId, li, fields) {
    const at = (status, extra = {}) => this.show(li, { status, ...extra });
    try {
      await followEvents(jobId, (name, data) => {
        if (name === "position") at("queued", data);
        else if (name === "started") at("running");
        else if (name === "progress") at("running", data);
        else if (name === "failed") {
          at("failed", data);
          this.onError(Object.assign(new Error(data.error.message), { code: data.error.code }));
        } else if (name === "cancelled") at("cancelled");
        else if (name === "complete") {
          at("complete");
          const link = document.createElement("a");
          Object.assign(link, { href: data.output, target: "_blank", rel: "noopener", textContent: "output" });
          li.querySelector(".state").after(" ", link);
          this.onComplete({ output: data.output, fields, seed: data.seed, ms: data.duration_ms, via: jobId });
        }
      });
    } catch (err) {
      li.querySelector(".state").textContent = `unknown: ${err.message}`;
      this.onError(err);
    }
  }

  async cancel(jobId, li) {
    const button = li.querySelector(".cancel");
    if (button) button.disabled = true;
    try {
      const job = await call("DELETE", `/jobs/${encodeURIComponent(jobId)}`);
      if (li.dataset.status !== "complete") this.show(li, job);
    } catch (err) {
      if (button) button.disabled = false;
      this.onError(err);
    }
  }
}
