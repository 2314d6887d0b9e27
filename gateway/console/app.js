// The console's entry point: the choices from config.json (tritonasr.contract's engines,
// languages, channel modes and endpointing presets), the API key field, and the tabs (ARIA tabs:
// arrow keys move between them; the URL's #fragment names the page).

import { apiKey, callJson, setApiKey } from "./api.js";
import * as jobs from "./jobs.js";
import * as live from "./live.js";
import * as speakers from "./speakers.js";
import * as transcribe from "./transcribe.js";

const LABELS = {
  engines: { "": "server default" },
  languages: { auto: "auto-detect", zh: "Chinese", en: "English", yue: "Cantonese", ja: "Japanese", ko: "Korean" },
  channel_modes: { mix: "mix the channels", separate: "each channel apart" },
};

// Each slot gets its own copy of the template it names.
function fillOptionSlots() {
  for (const slot of document.querySelectorAll("[data-options]")) {
    slot.replaceWith(document.getElementById(slot.dataset.options).content.cloneNode(true));
  }
}

function fillChoices(config) {
  const choices = { engines: ["", ...config.engines], languages: config.languages, channel_modes: config.channel_modes };
  for (const select of document.querySelectorAll("select[data-choices]")) {
    const kind = select.dataset.choices;
    for (const value of choices[kind]) select.append(new Option(LABELS[kind][value] || value, value));
  }
}

function keyField() {
  const field = document.getElementById("api-key");
  field.value = apiKey();
  field.addEventListener("change", () => setApiKey(field.value.trim()));
}

function tabs(pages) {
  const list = document.querySelectorAll('[role="tab"]');
  function select(tab, focus) {
    for (const other of list) {
      const on = other === tab;
      other.setAttribute("aria-selected", String(on));
      other.tabIndex = on ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !on;
      const page = pages[other.dataset.page];
      if (page && !on && page.hide) page.hide();
    }
    if (focus) tab.focus();
    const page = pages[tab.dataset.page];
    if (page && page.show) page.show();
    if (location.hash !== `#${tab.dataset.page}`) history.replaceState(null, "", `#${tab.dataset.page}`);
  }
  list.forEach((tab, index) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: list.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      select(list[(moves[event.key] + list.length) % list.length], true);
    });
  });
  const fromHash = () => [...list].find((tab) => `#${tab.dataset.page}` === location.hash);
  window.addEventListener("hashchange", () => fromHash() && select(fromHash(), false));
  select(fromHash() || list[0], false);
}

async function main() {
  fillOptionSlots();
  keyField();
  let config;
  try {
    config = await callJson("console/config.json");
  } catch (error) {
    document.getElementById("load-error").textContent = `The console could not load its settings: ${error.message}`;
    return;
  }
  fillChoices(config);
  transcribe.setUp(config);
  live.setUp(config);
  const pages = { speakers: speakers.setUp(config), jobs: jobs.setUp(config) };
  tabs(pages);
  document.body.dataset.ready = "true"; // (for tests and scripts: the page is set up)
}

main();
