// The Live page: the microphone through WS /v1/stream (docs/websocket-stream.md) as float32 at
// 16 kHz. Partials are rewritten in place; finals are appended with their latency: the time from
// sending the frame that holds the final's end to the final's arrival.

import { apiKey, socketUrl } from "./api.js";
import { clock, element, speakerName, tags, Voices } from "./format.js";
import { Microphone, SAMPLE_RATE } from "./microphone.js";
import { wavBlob } from "./wav.js";

const PARTIALS_MS = 400; // how often the open segment is shown, in ms of audio
const KEEP_MS = 30 * 60 * 1000; // the copy of the audio stops growing past 30 minutes

export function setUp(config) {
  const form = document.getElementById("live-form");
  const startButton = document.getElementById("l-start");
  const stopButton = document.getElementById("l-stop");
  const status = document.getElementById("l-status");
  const finals = document.getElementById("l-finals");
  const partial = document.getElementById("l-partial");
  const level = document.getElementById("l-level");
  const download = document.getElementById("l-download");
  let session = null;

  for (const [name, preset] of Object.entries(config.endpointing_presets)) {
    const parts = [];
    if (preset.end_silence_ms) parts.push(`${preset.end_silence_ms} ms silence`);
    if (preset.max_segment_ms) parts.push(`segments ≤ ${preset.max_segment_ms / 1000} s`);
    form.elements.endpointing.append(new Option(parts.length ? `${name} (${parts.join(", ")})` : name, name));
  }

  function running(on) {
    startButton.disabled = on;
    stopButton.disabled = !on;
    for (const field of form.querySelectorAll("select, input")) field.disabled = on;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (session) return;
    finals.replaceChildren();
    partial.textContent = "";
    if (download.href) URL.revokeObjectURL(download.href);
    download.hidden = true;
    session = new LiveSession(form, { status, finals, partial, level });
    running(true);
    try {
      await session.start();
      stopButton.focus();
    } catch (error) {
      status.textContent = `Could not start: ${error.message}`;
      await session.close();
      session = null;
      running(false);
      startButton.focus();
      return;
    }
    const kept = await session.done;
    session = null;
    running(false);
    startButton.focus();
    if (kept) {
      download.href = URL.createObjectURL(kept);
      download.hidden = false;
    }
  });
  stopButton.addEventListener("click", () => session && session.stop());
}

class LiveSession {
  constructor(form, view) {
    this.view = view;
    this.options = {
      type: "start",
      encoding: "float32",
      sample_rate: SAMPLE_RATE,
      language: form.elements.language.value,
      engine: form.elements.engine.value,
      speaker: form.elements.speaker.checked,
      partials_ms: form.elements.partials.checked ? PARTIALS_MS : 0,
      endpointing: form.elements.endpointing.value,
      api_key: apiKey() || null,
    };
    this.keep = form.elements.keep.checked ? [] : null;
    this.keptSamples = 0;
    this.voices = new Voices();
    this.started = false;
    this.stopping = false;
    this.waiting = []; // frames recorded before the gateway's `started`
    this.sent = []; // {end: samples sent after this frame, at: when}, for latencies
    this.samples = 0;
    this.microphone = new Microphone((frame, level) => this.frame(frame, level));
    this.done = new Promise((resolve) => {
      this.finish = resolve;
    });
  }

  async start() {
    this.view.status.textContent = "Connecting…";
    this.socket = new WebSocket(socketUrl("v1/stream"));
    this.socket.binaryType = "arraybuffer";
    this.socket.addEventListener("open", () => this.socket.send(JSON.stringify(this.options)));
    this.socket.addEventListener("message", (event) => this.message(JSON.parse(event.data)));
    this.socket.addEventListener("close", (event) => this.closed(event));
    await this.microphone.start();
  }

  frame(frame, level) {
    this.view.level.value = Math.min(1, level * 4);
    if (this.keep && this.keptSamples < (KEEP_MS * SAMPLE_RATE) / 1000) {
      this.keep.push(frame);
      this.keptSamples += frame.length;
    }
    if (this.started) this.send(frame);
    else this.waiting.push(frame);
  }

  send(frame) {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    this.socket.send(frame.buffer); // little-endian float32, as every browser's typed arrays are here
    this.samples += frame.length;
    this.sent.push({ end: this.samples, at: performance.now() });
  }

  message(message) {
    const view = this.view;
    if (message.type === "started") {
      this.started = true;
      view.status.textContent = "Listening: speak now.";
      for (const frame of this.waiting) this.send(frame);
      this.waiting = [];
    } else if (message.type === "partial") {
      view.partial.textContent = message.text;
      view.partial.dataset.index = message.index;
    } else if (message.type === "final") {
      view.partial.textContent = "";
      view.finals.append(this.line(message));
    } else if (message.type === "speaker") {
      const line = view.finals.querySelector(`[data-index="${message.index}"] .voice`);
      if (line) line.textContent = speakerName(message.speaker);
    } else if (message.type === "summary") {
      view.status.textContent = `Stopped: ${message.segment_count} segment${message.segment_count === 1 ? "" : "s"}`
        + ` in ${clock(message.duration_ms)} of audio.`;
    } else if (message.type === "error") {
      view.status.textContent = `Stopped by the gateway: ${message.message} (${message.code})`;
    }
  }

  // Time since the frame holding `endMs` went out; null when it was not sent (it always was).
  latency(endMs) {
    const sample = Math.round((endMs * SAMPLE_RATE) / 1000);
    const frame = this.sent.find((f) => f.end >= sample);
    this.sent = this.sent.filter((f) => f.end >= sample); // earlier frames hold no later final
    return frame ? Math.round(performance.now() - frame.at) : null;
  }

  line(final) {
    const latency = this.latency(final.end_ms);
    const item = element("li", {
      className: `segment ${this.voices.className(final.speaker)}`,
      attrs: { "data-index": final.index, "data-start-ms": final.start_ms, "data-end-ms": final.end_ms },
    });
    const head = element("div", { className: "segment-head" },
      element("span", { className: "time", text: `${clock(final.start_ms)} – ${clock(final.end_ms)}` }),
      element("span", { className: "voice", text: speakerName(final.speaker) }));
    for (const [kind, value] of tags(final)) {
      head.append(element("span", { className: `tag tag-${kind}`, text: value, attrs: { title: kind } }));
    }
    head.append(element("span", {
      className: "latency",
      text: latency === null ? "" : `latency ${latency} ms`
        + (final.triton_ms === null ? "" : ` (server ${Math.round(final.triton_ms)} ms)`),
      attrs: { title: "from sending the audio that ends this segment to this result (the server's part of it)" },
    }));
    item.append(head, element("p", { className: "text", text: final.text }));
    return item;
  }

  // The last frames, then `end`: the gateway sends the remaining finals and the summary, then closes.
  async stop() {
    if (this.stopping) return;
    this.stopping = true;
    this.view.status.textContent = "Finishing…";
    await this.microphone.stop();
    if (this.socket.readyState === WebSocket.OPEN) {
      if (!this.started) {
        this.socket.close();
        return;
      }
      this.socket.send(JSON.stringify({ type: "end" }));
    }
  }

  closed(event) {
    if (event.code !== 1000 && !this.view.status.textContent.startsWith("Stopped")) {
      this.view.status.textContent = `The connection closed (${event.code}${event.reason ? `: ${event.reason}` : ""}).`;
    }
    this.view.partial.textContent = "";
    this.view.level.value = 0;
    this.close().then(() => this.finish(this.keep ? wavBlob(this.keep, SAMPLE_RATE, "float32") : null));
  }

  async close() {
    await this.microphone.stop();
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close();
  }
}
