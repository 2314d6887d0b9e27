// How times, speakers and tags are shown; the same wording as the CLI's text output
// (tritonasr.client.formats).

// `MM:SS.mmm`, with hours in front past the first hour.
export function clock(ms) {
  ms = Math.max(0, Math.round(ms));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  const rest = ms % 1000;
  const text = `${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}.${String(rest).padStart(3, "0")}`;
  return h ? `${String(h).padStart(2, "0")}:${text}` : text;
}

// `alice` (an enrolled name), `speaker B` (an anonymous label), `no speaker` (too short, or off).
export function speakerName(speaker) {
  if (!speaker) return "no speaker";
  return speaker.id ? speaker.id : `speaker ${speaker.label}`;
}

// A key per voice, for colours: an enrolled name, else the label.
export function speakerKey(speaker) {
  if (!speaker) return "";
  return speaker.id ? `id:${speaker.id}` : `label:${speaker.label}`;
}

const PALETTE_SIZE = 8; // console.css defines .voice-0 … .voice-7

// Colours by order of first appearance: the first voice is always the first colour.
export class Voices {
  constructor() {
    this.known = new Map();
  }

  className(speaker) {
    const key = speakerKey(speaker);
    if (!key) return "voice-none";
    if (!this.known.has(key)) this.known.set(key, this.known.size % PALETTE_SIZE);
    return `voice-${this.known.get(key)}`;
  }
}

// SenseVoice's tags that say something: language, emotion, event (each may be null).
export function tags(segment) {
  return ["language", "emotion", "event"]
    .map((name) => [name, segment[name]])
    .filter(([, value]) => value);
}

export function element(tag, { className, text, attrs } = {}, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) if (child) node.append(child);
  return node;
}

export function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}
