// The generation controls, shaped by the chosen model's entry in GET /models.
//
// Only what the model takes is shown and sent: steps and guidance within its ranges (fixed or
// ignored values are shown, not sent), its samplers and schedulers, a negative prompt and LoRAs
// where it allows them, an input image for i2i/edit/i2v with a mask for edit. Fields left empty
// (seed, strength) are not sent, so the server's defaults apply.

const $ = (id) => document.getElementById(id);

const TASK_NAMES = {
  t2i: "text → image",
  i2i: "image → image",
  edit: "edit (inpaint)",
  t2v: "text → video",
  i2v: "image → video",
};
const IMAGE_TASKS = new Set(["i2i", "edit", "i2v"]);
const STRENGTH_TASKS = new Set(["i2i", "edit"]);

export class LocalError extends Error {
  /** A value the page can tell is wrong before asking the server. */
  constructor(message) {
    super(message);
    this.code = "invalid_parameters";
  }
}

export class Controls {
  constructor() {
    this.model = null;
    $("task").addEventListener("change", () => this.refresh());
    $("detail").addEventListener("change", () => this.refresh());
    for (const [input, out] of [["steps", "steps-value"], ["guidance", "guidance-value"],
      ["duration", "duration-value"], ["detail-strength", "detail-value"]]) {
      $(input).addEventListener("input", () => this.showValue(input, out));
    }
    $("seed-random").addEventListener("click", () => {
      $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    });
    $("lora-add").addEventListener("click", () => this.addLora());
  }

  /** Fit the controls to ``model`` (an entry of GET /models). */
  use(model) {
    this.model = model;
    const info = model.info || {};
    fill($("task"), model.tasks.map((t) => [t, TASK_NAMES[t] || t]));
    fill($("format"), model.formats.map((f) => [f, f]));
    fill($("sampler"), (info.samplers || []).map((s) => [s, s]));
    fill($("scheduler"), (info.schedulers || []).map((s) => [s, s]));

    const steps = $("steps");
    if (info.fixed_steps !== undefined) {
      setRange(steps, info.fixed_steps, info.fixed_steps, 1, info.fixed_steps);
      steps.disabled = true;
    } else {
      setRange(steps, info.steps_range[0], info.steps_range[1], 1, info.default_steps);
      steps.disabled = false;
    }
    const guidance = $("guidance");
    if (info.guidance_range) {
      setRange(guidance, info.guidance_range[0], info.guidance_range[1], 0.1, info.default_guidance);
      guidance.disabled = false;
    } else {
      const value = info.fixed_guidance ?? 0;
      setRange(guidance, value, value, 0.1, value);
      guidance.disabled = true;
    }
    if (info.duration_range) {
      const [lo, hi] = info.duration_range;
      setRange($("duration"), lo, hi, 0.5, Math.min(hi, Math.max(lo, 2)));
    }
    $("lora-refusal").textContent = info.lora_refusal
      ? `No LoRAs: ${info.lora_refusal}.` : "This model takes no LoRAs.";
    $("loras").replaceChildren();

    const note = [info.parameters && `${info.parameters} parameters`, model.status !== "active" && model.status,
      info.note].filter(Boolean).join(" · ");
    $("model-note").textContent = note;
    this.refresh();
  }

  /** Show what the current model and task take, hide the rest. */
  refresh() {
    const model = this.model;
    if (!model) return;
    const info = model.info || {};
    const task = $("task").value;
    // GET /models says which tasks take a strength and which upscale/detail passes the model takes
    const strengthTasks = info.strength_tasks ? new Set(info.strength_tasks) : STRENGTH_TASKS;
    const refinements = info.refinements || [];
    const flags = {
      negative: Boolean(info.negative_prompt),
      image: IMAGE_TASKS.has(task),
      mask: task === "edit",
      strength: strengthTasks.has(task),
      duration: Boolean(info.duration_range),
      samplers: Boolean(info.samplers && info.samplers.length),
      loras: Boolean(info.loras),
      "no-loras": !info.loras,
      refine: refinements.length > 0,
      "no-refine": refinements.length === 0,
      upscale: refinements.includes("upscale"),
      "detail-pass": refinements.includes("detail_enhance"),
      detail: refinements.includes("detail_enhance") && $("detail").checked,
    };
    for (const el of document.querySelectorAll("#controls [data-show]")) {
      el.hidden = !flags[el.dataset.show];
    }
    for (const [input, out] of [["steps", "steps-value"], ["guidance", "guidance-value"],
      ["duration", "duration-value"], ["detail-strength", "detail-value"]]) {
      this.showValue(input, out);
    }
  }

  showValue(inputId, outId) {
    const info = (this.model && this.model.info) || {};
    const value = $(inputId).value;
    let text = value;
    if (inputId === "steps" && info.fixed_steps !== undefined) text = `${value} (fixed)`;
    if (inputId === "guidance" && !info.guidance_range) {
      text = info.fixed_guidance !== undefined ? `${info.fixed_guidance} (fixed)` : "ignored by this model";
    }
    $(outId).textContent = text;
  }

  addLora(url = "", weight = 1.0) {
    const row = document.createElement("div");
    row.className = "lora row";
    const link = input("url", "LoRA URL (.safetensors) or Hugging Face repo", url);
    link.className = "lora-url";
    const strength = input("number", "weight", String(weight));
    strength.className = "lora-weight";
    Object.assign(strength, { min: "0", max: "1.5", step: "0.05", title: "weight, 0-1.5" });
    const remove = document.createElement("button");
    Object.assign(remove, { type: "button", className: "secondary", textContent: "✕", title: "remove" });
    remove.addEventListener("click", () => row.remove());
    row.append(link, strength, remove);
    $("loras").append(row);
    link.focus();
  }

  /** The generation fields for the API (without image and mask), or a LocalError. */
  read() {
    const model = this.model;
    const info = model.info || {};
    const fields = {
      modality: model.modality,
      family: model.family,
      model: model.model,
      task: $("task").value,
      format: $("format").value,
      prompt: $("prompt").value.trim(),
    };
    const shown = (id) => !$(id).closest("[hidden]");
    if (shown("negative") && $("negative").value.trim()) fields.negative_prompt = $("negative").value.trim();
    if (info.fixed_steps === undefined) fields.steps = Number($("steps").value);
    if (info.guidance_range) fields.guidance = Number($("guidance").value);
    const seed = $("seed");
    if (!seed.validity.valid) throw new LocalError("seed: a whole number from 0 to 4294967295");
    if (seed.value !== "") fields.seed = Number(seed.value);
    if (shown("sampler")) {
      fields.sampler = $("sampler").value;
      fields.scheduler = $("scheduler").value;
    }
    if (shown("duration")) fields.duration = Number($("duration").value);
    if (shown("strength") && $("strength").value !== "") {
      if (!$("strength").validity.valid) throw new LocalError("strength: a number above 0 and at most 1");
      fields.strength = Number($("strength").value);
    }
    if (shown("loras")) {
      const loras = [...document.querySelectorAll("#loras .lora")]
        .map((row) => ({ url: row.querySelector(".lora-url").value.trim(),
          weight: Number(row.querySelector(".lora-weight").value) }))
        .filter((lora) => lora.url);
      if (loras.length) fields.loras = loras;
    }
    if (shown("upscale") && $("upscale").value) fields.upscale = Number($("upscale").value);
    if (shown("detail") && $("detail").checked) {
      fields.detail_enhance = true;
      fields.detail_strength = Number($("detail-strength").value);
    }
    return fields;
  }
}

/** One line that says how an output was made (for the history). */
export function describe(fields) {
  const parts = [`${fields.family}/${fields.model}`, fields.task, fields.format];
  if (fields.steps !== undefined) parts.push(`${fields.steps} steps`);
  if (fields.guidance !== undefined) parts.push(`guidance ${fields.guidance}`);
  if (fields.sampler) parts.push(`${fields.sampler}/${fields.scheduler}`);
  if (fields.strength !== undefined) parts.push(`strength ${fields.strength}`);
  if (fields.duration !== undefined) parts.push(`${fields.duration} s`);
  if (fields.loras) parts.push(fields.loras.map((l) => `LoRA ${l.url} × ${l.weight}`).join(", "));
  if (fields.upscale) parts.push(`upscale ${fields.upscale}×`);
  if (fields.detail_enhance) parts.push(`detail ${fields.detail_strength}`);
  if (fields.negative_prompt) parts.push(`not: ${fields.negative_prompt}`);
  return parts.join(" · ");
}

function fill(select, pairs) {
  const before = select.value;
  select.replaceChildren(...pairs.map(([value, label]) => new Option(label, value)));
  if (pairs.some(([value]) => value === before)) select.value = before;
}

function setRange(el, min, max, step, value) {
  Object.assign(el, { min: String(min), max: String(max), step: String(step) });
  el.value = String(value);
}

function input(type, placeholder, value) {
  const el = document.createElement("input");
  Object.assign(el, { type, placeholder, value });
  return el;
}
