// A transcription drawn as a timeline (one lane per channel, a block per segment coloured by its
// voice, Parakeet's words as marks inside it) and as a list of segments (times, voice, tags,
// text, words). Both from verbose_json: seconds, as OpenAI's API gives them.

import { clock, element, speakerName, tags, Voices } from "./format.js";

const TICKS = 6; // time labels along the axis

// The segments as the console shows them: times in ms, words placed in their segment.
export function fromVerbose(result) {
  const words = (result.words || []).map((w) => ({
    text: w.word,
    start_ms: Math.round(w.start * 1000),
    end_ms: Math.round(w.end * 1000),
  }));
  return result.segments.map((s) => {
    const segment = {
      start_ms: Math.round(s.start * 1000),
      end_ms: Math.round(s.end * 1000),
      text: s.text,
      speaker: s.speaker || null,
      language: s.language || null,
      emotion: s.emotion || null,
      event: s.event || null,
      channel: s.channel ?? null,
      words: null,
    };
    if (result.words) {
      segment.words = words.filter((w) => w.start_ms >= segment.start_ms && w.end_ms <= segment.end_ms);
    }
    return segment;
  });
}

// Renders into `timeline` and `list` (emptied first); `onSeek(ms)` when a segment is chosen.
export function render(segments, durationMs, timeline, list, onSeek) {
  const voices = new Voices();
  timeline.replaceChildren();
  list.replaceChildren();
  const total = Math.max(durationMs, ...segments.map((s) => s.end_ms), 1);
  const channels = [...new Set(segments.map((s) => s.channel))].sort((a, b) => (a ?? -1) - (b ?? -1));
  const lanes = new Map();
  for (const channel of channels.length ? channels : [null]) {
    const track = element("div", { className: "track" });
    const lane = element("div", { className: "lane" },
      element("span", { className: "lane-name", text: channel === null ? "audio" : `ch ${channel}` }), track);
    lanes.set(channel, track);
    timeline.append(lane);
  }
  const axis = element("div", { className: "axis", attrs: { "aria-hidden": "true" } });
  for (let i = 0; i <= TICKS; i++) {
    const tick = element("span", { className: "tick", text: clock((total * i) / TICKS).replace(/\.\d+$/, "") });
    tick.style.left = `${(100 * i) / TICKS}%`;
    axis.append(tick);
  }
  timeline.append(axis);

  segments.forEach((segment, index) => {
    const voice = voices.className(segment.speaker);
    const name = speakerName(segment.speaker);
    const id = `segment-${index}`;
    const item = element("li", {
      className: `segment ${voice}`,
      attrs: {
        id,
        tabindex: "-1",
        "data-start-ms": segment.start_ms,
        "data-end-ms": segment.end_ms,
      },
    });
    const head = element("div", { className: "segment-head" },
      element("span", { className: "time", text: `${clock(segment.start_ms)} – ${clock(segment.end_ms)}` }),
      segment.channel !== null ? element("span", { className: "channel", text: `ch ${segment.channel}` }) : null,
      element("span", { className: "voice", text: name }));
    for (const [kind, value] of tags(segment)) {
      head.append(element("span", { className: `tag tag-${kind}`, text: value, attrs: { title: kind } }));
    }
    item.append(head, element("p", { className: "text", text: segment.text }));
    if (segment.words && segment.words.length) {
      const words = element("p", { className: "words", attrs: { "aria-label": "words with their times" } });
      for (const word of segment.words) {
        words.append(element("span", {
          className: "word",
          text: word.text,
          attrs: { title: `${clock(word.start_ms)} – ${clock(word.end_ms)}` },
        }), " ");
      }
      item.append(words);
    }
    list.append(item);

    const block = element("button", {
      className: `block ${voice}`,
      attrs: {
        type: "button",
        title: `${clock(segment.start_ms)} – ${clock(segment.end_ms)} ${name}: ${segment.text}`,
        "aria-label": `${clock(segment.start_ms)}, ${name}: ${segment.text}`,
      },
    });
    block.style.left = `${(100 * segment.start_ms) / total}%`;
    block.style.width = `${Math.max((100 * (segment.end_ms - segment.start_ms)) / total, 0.4)}%`;
    for (const word of segment.words || []) {
      const mark = element("span", { className: "word-mark" });
      mark.style.left = `${(100 * (word.start_ms - segment.start_ms)) / Math.max(segment.end_ms - segment.start_ms, 1)}%`;
      block.append(mark);
    }
    block.addEventListener("click", () => {
      item.focus();
      onSeek(segment.start_ms);
    });
    lanes.get(segment.channel).append(block);
  });
}
