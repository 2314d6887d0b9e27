// The Speakers page: GET/POST/DELETE /v1/speakers. Enrolling and removing need the server's
// admin key (X-Admin-Key), which the page keeps in the field only: never stored.

import { call, callJson, describe } from "./api.js";
import { element, seconds } from "./format.js";
import { Microphone, SAMPLE_RATE } from "./microphone.js";
import { durationMs, wavBlob } from "./wav.js";

export function setUp() {
  const form = document.getElementById("enroll-form");
  const adminKey = document.getElementById("s-admin-key");
  const status = document.getElementById("s-status");
  const table = document.querySelector("#s-table tbody");
  const empty = document.getElementById("s-empty");
  const recordButton = document.getElementById("s-record");
  const recordStop = document.getElementById("s-record-stop");
  const recordingsList = document.getElementById("s-recordings");
  const recordings = []; // {file, url}
  let microphone = null;

  function adminHeaders() {
    return adminKey.value ? { "X-Admin-Key": adminKey.value } : {};
  }

  async function refresh() {
    try {
      const { data } = await callJson("v1/speakers");
      table.replaceChildren(...data.map(row));
      empty.hidden = data.length > 0;
    } catch (error) {
      status.textContent = `Could not list the speakers: ${describe(error)}`;
    }
  }

  function row(speaker) {
    const remove = element("button", {
      className: "secondary",
      text: "Remove",
      attrs: { type: "button", "aria-label": `Remove ${speaker.name}` },
    });
    remove.addEventListener("click", async () => {
      status.textContent = `Removing ${speaker.name}…`;
      try {
        await call(`v1/speakers/${encodeURIComponent(speaker.name)}`, { method: "DELETE", headers: adminHeaders() });
        status.textContent = `Removed ${speaker.name}.`;
        await refresh();
        adminKey.focus();
      } catch (error) {
        status.textContent = `Could not remove ${speaker.name}: ${describe(error)}`;
      }
    });
    return element("tr", { attrs: { "data-name": speaker.name } },
      element("th", { text: speaker.name, attrs: { scope: "row" } }),
      element("td", { text: seconds(speaker.speech_ms) }),
      element("td", { text: new Date(speaker.enrolled_at).toLocaleString(), attrs: { title: speaker.enrolled_at } }),
      element("td", {}, remove));
  }

  function showRecordings() {
    recordingsList.replaceChildren(...recordings.map((recording, index) => {
      const audio = element("audio", { attrs: { controls: "", src: recording.url, "aria-label": recording.file.name } });
      const drop = element("button", {
        className: "secondary",
        text: "Discard",
        attrs: { type: "button", "aria-label": `Discard ${recording.file.name}` },
      });
      drop.addEventListener("click", () => {
        URL.revokeObjectURL(recording.url);
        recordings.splice(index, 1);
        showRecordings();
        recordButton.focus();
      });
      return element("li", {}, element("span", { text: `${recording.file.name} (${seconds(recording.ms)})` }), audio, drop);
    }));
  }

  recordButton.addEventListener("click", async () => {
    const chunks = [];
    microphone = new Microphone((frame) => chunks.push(frame));
    recordButton.disabled = true;
    try {
      await microphone.start();
    } catch (error) {
      status.textContent = `Could not record: ${error.message}`;
      recordButton.disabled = false;
      return;
    }
    recordStop.disabled = false;
    recordStop.focus();
    status.textContent = "Recording: let the speaker talk alone, then stop.";
    recordStop.onclick = async () => {
      recordStop.disabled = true;
      await microphone.stop();
      const file = new File([wavBlob(chunks, SAMPLE_RATE)], `recording-${recordings.length + 1}.wav`,
        { type: "audio/wav" });
      recordings.push({ file, url: URL.createObjectURL(file), ms: durationMs(chunks, SAMPLE_RATE) });
      showRecordings();
      status.textContent = `Recorded ${seconds(durationMs(chunks, SAMPLE_RATE))}.`;
      recordButton.disabled = false;
      recordButton.focus();
    };
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = form.elements.name.value.trim();
    const files = [...form.elements.files.files, ...recordings.map((r) => r.file)];
    if (!name || !files.length) {
      status.textContent = "Give a name and at least one recording (a file, or the microphone).";
      return;
    }
    const body = new FormData();
    body.append("name", name);
    body.append("replace", String(form.elements.replace.checked));
    for (const file of files) body.append("file", file, file.name);
    status.textContent = `Enrolling ${name}…`;
    form.setAttribute("aria-busy", "true");
    try {
      const result = await callJson("v1/speakers", { method: "POST", body, headers: adminHeaders() });
      status.textContent = `Enrolled ${result.name} from ${result.recordings} recording`
        + `${result.recordings === 1 ? "" : "s"}, ${seconds(result.speech_ms)} of speech.`;
      form.elements.name.value = "";
      form.elements.files.value = "";
      form.elements.replace.checked = false;
      for (const recording of recordings) URL.revokeObjectURL(recording.url);
      recordings.length = 0;
      showRecordings();
      await refresh();
    } catch (error) {
      status.textContent = `Could not enroll ${name}: ${describe(error)}`;
    } finally {
      form.removeAttribute("aria-busy");
    }
  });
  document.getElementById("s-refresh").addEventListener("click", refresh);
  return { show: refresh };
}
