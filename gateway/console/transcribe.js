// The Transcribe page: a file (dropped or chosen) through POST /v1/audio/transcriptions as
// verbose_json, shown as a timeline and a list of segments.

import { callJson, describe } from "./api.js";
import { clock } from "./format.js";
import { fromVerbose, render } from "./timeline.js";

export function setUp(config) {
  const form = document.getElementById("transcribe-form");
  const input = document.getElementById("t-file");
  const drop = document.getElementById("t-drop");
  const status = document.getElementById("t-status");
  const player = document.getElementById("t-player");
  const summary = document.getElementById("t-summary");
  let file = null;
  let controller = null;

  async function transcribe() {
    if (!file) {
      status.textContent = "Choose or drop an audio file first.";
      return;
    }
    if (file.size > config.max_upload_bytes) {
      status.textContent = `${file.name} is larger than this gateway takes (${config.max_upload_bytes} bytes).`;
      return;
    }
    if (controller) controller.abort();
    controller = new AbortController();
    const engine = form.elements.engine.value;
    const body = new FormData();
    body.append("file", file, file.name);
    body.append("model", engine || config.default_model);
    body.append("language", form.elements.language.value);
    body.append("channels", form.elements.channels.value);
    body.append("speaker", String(form.elements.speaker.checked));
    body.append("itn", String(form.elements.itn.checked));
    body.append("response_format", "verbose_json");
    if (engine === "parakeet") {
      // Parakeet times its words; SenseVoice has none to give (the gateway says so with a 400).
      body.append("timestamp_granularities[]", "segment");
      body.append("timestamp_granularities[]", "word");
    }
    status.textContent = `Transcribing ${file.name}…`;
    form.setAttribute("aria-busy", "true");
    const began = performance.now();
    try {
      const result = await callJson("v1/audio/transcriptions", { method: "POST", body, signal: controller.signal });
      const segments = fromVerbose(result);
      const durationMs = Math.round(result.duration * 1000);
      render(segments, durationMs, document.getElementById("t-timeline"),
        document.getElementById("t-segments"), (ms) => {
          player.currentTime = ms / 1000;
          player.play().catch(() => {});
        });
      summary.textContent = `${file.name}: ${segments.length} segment${segments.length === 1 ? "" : "s"} in `
        + `${clock(durationMs)} of audio, language ${result.language}`;
      status.textContent = `Done in ${((performance.now() - began) / 1000).toFixed(1)} s.`;
      document.getElementById("t-result").hidden = false;
    } catch (error) {
      if (error.name !== "AbortError") status.textContent = `Failed: ${describe(error)}`;
    } finally {
      form.removeAttribute("aria-busy");
    }
  }

  function choose(chosen) {
    if (!chosen) return;
    file = chosen;
    if (player.src) URL.revokeObjectURL(player.src);
    player.src = URL.createObjectURL(file);
    transcribe();
  }

  input.addEventListener("change", () => choose(input.files[0]));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    transcribe();
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
}
