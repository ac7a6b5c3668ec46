// The playground's page: models from GET /models, generations over /ws with step previews,
// the async queue, the session's history, and the API key dialog.
//
// The stage element carries data-state (idle, running, complete, cancelled, error) and
// data-frames (previews drawn for the current generation before its final image): the
// browser test reads them, and so can anyone debugging the page.

import { ApiError, auth, call, forgetKey, loadModels, onKeyNeeded, renewKey } from "./api.js";
import { Controls, describe } from "./controls.js";
import { History, isVideo } from "./history.js";
import { Queue } from "./jobs.js";
import { Live } from "./live.js";
import { MaskEditor } from "./mask.js";

const $ = (id) => document.getElementById(id);
const MODEL_STORAGE = "kiln.model";

const controls = new Controls();
const live = new Live();
const mask = new MaskEditor();
const history = new History({ onShow: (entry) => showOutput(entry), onSeed: (seed) => { $("seed").value = seed; } });
const queue = new Queue({ onComplete: (entry) => history.add(entry), onError: (err) => showError(err) });
let models = [];
let current = null; // the generation on the stage: {id, done}
let upload = null; // {file, url}: the input image as POST /uploads stored it

// --- errors --------------------------------------------------------------------------------

function showError(err) {
  $("error-code").textContent = err.code ? `${err.code}:` : "error:";
  $("error-message").textContent = err.message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

$("error-close").addEventListener("click", clearError);

// --- the API key ---------------------------------------------------------------------------

let keyWaiter = null;

onKeyNeeded((message) => {
  $("key-message").textContent = message;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
  return new Promise((resolve, reject) => {
    keyWaiter = { resolve, reject };
  });
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  $("key-dialog").close();
  showKeyStatus(key);
  const waiter = keyWaiter;
  keyWaiter = null;
  if (waiter) waiter.resolve(key);
});

function cancelKey() {
  if ($("key-dialog").open) $("key-dialog").close();
  const waiter = keyWaiter;
  keyWaiter = null;
  if (waiter) waiter.reject(new ApiError(401, "invalid_token", "no API key given"));
}

$("key-cancel").addEventListener("click", cancelKey);
$("key-dialog").addEventListener("cancel", (event) => {
  event.preventDefault();
  cancelKey();
});

$("key-change").addEventListener("click", async () => {
  try {
    forgetKey();
    await renewKey("Enter the API key to use from now on.");
    await start();
  } catch (err) {
    showError(err);
  }
});

function showKeyStatus(key = auth.key) {
  if (auth.required === false) {
    $("key-status").textContent = "no key needed";
    $("key-change").hidden = true;
  } else {
    $("key-status").textContent = key ? `key …${key.slice(-4)}` : "no key";
    $("key-change").hidden = false;
  }
}

// --- models --------------------------------------------------------------------------------

function modelKey(m) {
  return `${m.family}/${m.model}`;
}

async function start() {
  clearError();
  const body = await loadModels();
  showKeyStatus();
  models = body.models;
  const select = $("model");
  select.replaceChildren(...models.map((m) => {
    const label = m.status === "active" ? modelKey(m) : `${modelKey(m)} (${m.status.replace("_", " ")})`;
    return new Option(label, modelKey(m));
  }));
  const saved = localStorage.getItem(MODEL_STORAGE);
  const preferred = models.find((m) => modelKey(m) === saved) || models.find((m) => m.default) || models[0];
  if (preferred) {
    select.value = modelKey(preferred);
    controls.use(preferred);
  }
  $("generate").disabled = !preferred;
  $("enqueue").disabled = !preferred;
}

$("model").addEventListener("change", () => {
  const model = models.find((m) => modelKey(m) === $("model").value);
  localStorage.setItem(MODEL_STORAGE, $("model").value);
  controls.use(model);
});

// --- the input image and mask --------------------------------------------------------------

$("image-file").addEventListener("change", async () => {
  clearError();
  const file = $("image-file").files[0];
  upload = null;
  if (!file) return;
  try {
    await mask.load(file);
  } catch (err) {
    showError(err);
  }
});

async function uploadFile(blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  return (await call("POST", "/uploads", { form })).url;
}

/** The request's fields with the input image (and the mask for edit) uploaded. */
async function withInputs(fields) {
  if (!["i2i", "edit", "i2v"].includes(fields.task)) return fields;
  if (!mask.file) throw new ApiError(0, "invalid_parameters", `${fields.task} needs an input image: choose a file`);
  if (!upload || upload.file !== mask.file) {
    upload = { file: mask.file, url: await uploadFile(mask.file, mask.file.name) };
  }
  const out = { ...fields, image: upload.url };
  if (fields.task === "edit") {
    if (!mask.painted) throw new ApiError(0, "invalid_parameters", "edit needs a mask: paint the area to regenerate");
    out.mask = await uploadFile(await mask.maskPng(), "mask.png");
  }
  return out;
}

// --- the stage -----------------------------------------------------------------------------

function stage(state, status = "") {
  $("stage").dataset.state = state;
  $("stage-status").textContent = status;
  $("progress").hidden = state !== "running";
}

function showOutput(entry) {
  const video = isVideo(entry.output);
  if ($("stage").dataset.state !== "running") $("stage-status").textContent = "";
  $("placeholder").hidden = true;
  $("preview").hidden = true;
  $("result").hidden = video;
  $("result-video").hidden = !video;
  if (video) $("result-video").src = entry.output;
  else $("result").src = entry.output;
  const meta = $("result-meta");
  const link = document.createElement("a");
  Object.assign(link, { href: entry.output, target: "_blank", rel: "noopener", textContent: entry.output });
  meta.replaceChildren(`${describe(entry.fields)} · seed ${entry.seed} · `, link);
}

/** Draw one step preview (base64 WebP) on the preview canvas. */
async function drawFrame(frame) {
  const img = new Image();
  img.src = `data:image/webp;base64,${frame.data}`;
  await img.decode();
  const canvas = $("preview");
  if (canvas.width !== img.naturalWidth || canvas.height !== img.naturalHeight) {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
  }
  canvas.getContext("2d").drawImage(img, 0, 0);
}

async function generate() {
  clearError();
  if ($("generate").disabled) return;
  $("generate").disabled = true;
  $("stage").dataset.frames = "0";
  $("progress").value = 0;
  stage("running", "sending…"); // at once: the uploads below take a while
  let fields;
  try {
    fields = await withInputs(controls.read());
  } catch (err) {
    stage("error");
    showError(err);
    $("generate").disabled = false;
    return;
  }
  $("stop").hidden = false;
  $("stage-status").textContent = "starting…";
  let frames = Promise.resolve(); // previews are drawn in order, all before the final image
  let drawn = 0;
  let retried = false;
  for (;;) {
    try {
      current = await live.generate(fields, (frame) => {
        frames = frames.then(() => drawFrame(frame)).then(() => {
          drawn += 1;
          $("stage").dataset.frames = String(drawn);
          $("preview").hidden = false;
          $("result").hidden = true;
          $("result-video").hidden = true;
          $("placeholder").hidden = true;
        }).catch((exc) => {
          $("stage-status").textContent = `a step preview could not be shown (${exc.message})`;
        });
        $("progress").value = frame.step / frame.total_steps;
        $("stage-status").textContent = `step ${frame.step}/${frame.total_steps}`;
      });
      const done = await current.done;
      await frames;
      const entry = { output: done.output, fields, seed: done.seed, ms: done.latency_ms, via: "websocket" };
      showOutput(entry);
      if (!isVideo(done.output)) await $("result").decode();
      history.add(entry);
      stage("complete", `done in ${done.latency_ms} ms`);
      break;
    } catch (err) {
      // the key was revoked or replaced since the page loaded: ask once, then try again
      if (!retried && ["invalid_token", "token_expired"].includes(err.code)) {
        retried = true;
        try {
          await renewKey(err.message);
          continue;
        } catch (keyErr) {
          err = keyErr;
        }
      }
      if (err.code === "cancelled") {
        stage("cancelled", "stopped");
      } else {
        stage("error", "");
        showError(err);
      }
      break;
    }
  }
  current = null;
  $("generate").disabled = false;
  $("stop").hidden = true;
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});

$("stop").addEventListener("click", () => {
  if (current) live.cancel(current.id).catch(showError);
});

$("enqueue").addEventListener("click", async () => {
  clearError();
  try {
    await queue.submit(await withInputs(controls.read()));
  } catch (err) {
    showError(err);
  }
});

start().catch(showError);
