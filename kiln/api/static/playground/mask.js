// The input image of i2i, edit and i2v, and the mask brush drawn over it for edit.
//
// The mask canvas has the image's own pixel size (the server fits image and mask to the output
// size together), so strokes land where they were painted whatever size the page shows it at.
// It is shown in a colour that stands out on most pictures and sent as a PNG: black = keep,
// white = regenerate.

const $ = (id) => document.getElementById(id);

export class MaskEditor {
  constructor() {
    this.file = null;
    this.objectUrl = null;
    this.painted = false;
    this.canvas = $("mask");
    this.ctx = this.canvas.getContext("2d");
    this.last = null;
    this.canvas.addEventListener("pointerdown", (e) => this.down(e));
    this.canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      this.canvas.addEventListener(name, () => { this.last = null; });
    }
    $("mask-clear").addEventListener("click", () => this.clear());
  }

  /** Show ``file`` (a File the user picked) with an empty mask over it. */
  async load(file) {
    const img = $("image-preview");
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
    this.objectUrl = URL.createObjectURL(file);
    img.src = this.objectUrl;
    try {
      await img.decode();
    } catch {
      throw new Error("the browser cannot read this file as an image");
    }
    this.file = file;
    this.canvas.width = img.naturalWidth;
    this.canvas.height = img.naturalHeight;
    this.clear();
    $("mask-editor").hidden = false;
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.canvas.dataset.painted = "false";
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (this.canvas.width / box.width),
      (event.clientY - box.top) * (this.canvas.height / box.height)];
  }

  down(event) {
    if (this.canvas.closest("[hidden]") || $("task").value !== "edit") return;
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke(from, to) {
    const box = this.canvas.getBoundingClientRect();
    const ctx = this.ctx;
    ctx.strokeStyle = "#ff3d6e";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    // the brush slider is in screen pixels: the same brush looks the same on any image size
    ctx.lineWidth = Number($("brush").value) * (this.canvas.width / box.width);
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    this.painted = true;
    this.canvas.dataset.painted = "true";
  }

  /** The mask as a PNG Blob: white where painted, black elsewhere, at the image's size. */
  async maskPng() {
    const { width, height } = this.canvas;
    const strokes = document.createElement("canvas");
    Object.assign(strokes, { width, height });
    const sctx = strokes.getContext("2d");
    sctx.drawImage(this.canvas, 0, 0);
    sctx.globalCompositeOperation = "source-in"; // the painted pixels, turned white
    sctx.fillStyle = "#fff";
    sctx.fillRect(0, 0, width, height);
    const out = document.createElement("canvas");
    Object.assign(out, { width, height });
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    ctx.drawImage(strokes, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
