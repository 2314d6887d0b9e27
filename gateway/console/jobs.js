// The Jobs page: batch jobs through /v1/jobs (submit files, follow their progress, download each
// file's result as JSON, SRT, WebVTT or text, cancel, delete a finished job). The page asks again
// every POLL_MS while it is shown and a job is unfinished (an open job, still receiving files from
// another client, is unfinished).

import { call, callJson, describe } from "./api.js";
import { element } from "./format.js";

const POLL_MS = 1000;
const LIST_LIMIT = 20;
// Download -> the result's format (json: the segments with their times, verbose_json).
const DOWNLOADS = { json: "verbose_json", srt: "srt", vtt: "vtt", txt: "text" };
const FINISHED = ["completed", "cancelled"];

export function setUp(config) {
  const form = document.getElementById("job-form");
  const status = document.getElementById("j-status");
  const unavailable = document.getElementById("j-unavailable");
  const list = document.querySelector("#j-table tbody");
  const empty = document.getElementById("j-empty");
  const detail = document.getElementById("j-detail");
  let selected = null;
  let timer = null;
  let shown = false;

  async function refresh() {
    clearTimeout(timer);
    let unfinished = false;
    try {
      const { data } = await callJson(`v1/jobs?limit=${LIST_LIMIT}`);
      unavailable.hidden = true;
      form.hidden = false;
      list.replaceChildren(...data.map(jobRow));
      empty.hidden = data.length > 0;
      unfinished = data.some((job) => !FINISHED.includes(job.status));
      if (selected) {
        const job = await callJson(`v1/jobs/${encodeURIComponent(selected)}`);
        showJob(job);
        unfinished ||= !FINISHED.includes(job.status);
      }
    } catch (error) {
      if (error.status === 404 && !selected) {
        unavailable.hidden = false;
        form.hidden = true;
        return;
      }
      status.textContent = `Could not read the jobs: ${describe(error)}`;
    }
    if (shown && unfinished) timer = setTimeout(refresh, POLL_MS);
  }

  function jobRow(job) {
    const counts = job.counts;
    const open = element("button", {
      className: "secondary",
      text: "Show",
      attrs: { type: "button", "aria-label": `Show job ${job.id}` },
    });
    open.addEventListener("click", () => {
      selected = job.id;
      refresh().then(() => detail.focus());
    });
    const actions = element("td", { className: "actions" }, open);
    if (FINISHED.includes(job.status)) actions.append(" ", deleteButton(job, "Delete"));
    return element("tr", { attrs: { "data-id": job.id, "data-status": job.status } },
      element("th", { text: job.id, attrs: { scope: "row" } }),
      element("td", { text: new Date(job.created_at * 1000).toLocaleString() }),
      statusCell("td", job),
      element("td", { text: `${counts.done} done, ${counts.failed} failed of ${counts.total}` }),
      actions);
  }

  // A job's status; an open one says that it still takes files.
  function statusCell(tag, job) {
    const text = job.open ? `${job.status} (open: taking files)` : job.status;
    return element(tag, { className: `status status-${job.status}`, text, attrs: { "data-open": String(Boolean(job.open)) } });
  }

  // Deletes a finished job with its results (DELETE /v1/jobs/{id}); the gateway refuses an
  // unfinished or open one.
  function deleteButton(job, text) {
    const button = element("button", {
      className: "secondary",
      text,
      attrs: { type: "button", "data-action": "delete", "aria-label": `Delete job ${job.id} and its results` },
    });
    button.addEventListener("click", async () => {
      status.textContent = `Deleting job ${job.id}…`;
      try {
        await callJson(`v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
        if (selected === job.id) {
          selected = null;
          detail.hidden = true;
          detail.replaceChildren();
        }
        status.textContent = `Deleted job ${job.id}.`;
        await refresh();
        document.getElementById("j-refresh").focus();
      } catch (error) {
        status.textContent = `Could not delete job ${job.id}: ${describe(error)}`;
      }
    });
    return button;
  }

  function showJob(job) {
    detail.hidden = false;
    detail.dataset.id = job.id;
    detail.dataset.status = job.status;
    const head = element("div", { className: "job-head" },
      element("h3", { text: `Job ${job.id}` }),
      statusCell("span", job));
    if (FINISHED.includes(job.status)) head.append(deleteButton(job, "Delete job"));
    if (!FINISHED.includes(job.status)) {
      const cancel = element("button", { className: "secondary", text: "Cancel job", attrs: { type: "button" } });
      cancel.addEventListener("click", async () => {
        try {
          showJob(await callJson(`v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
          status.textContent = `Cancelled job ${job.id}.`;
        } catch (error) {
          status.textContent = `Could not cancel: ${describe(error)}`;
        }
      });
      head.append(cancel);
    }
    const rows = job.files.map((file) => {
      const progress = element("progress", { attrs: { max: file.total_ms || 1, "aria-label": `${file.name} progress` } });
      progress.value = file.status === "done" ? file.total_ms || 1 : file.done_ms;
      const downloads = element("td", { className: "downloads" });
      if (file.status === "done") {
        for (const [label, format] of Object.entries(DOWNLOADS)) {
          const button = element("button", {
            className: "secondary",
            text: label,
            attrs: { type: "button", "data-format": label, "aria-label": `Download ${file.name} as ${label}` },
          });
          button.addEventListener("click", () => download(job, file, label, format));
          downloads.append(button, " ");
        }
      }
      return element("tr", { attrs: { "data-file": file.name, "data-status": file.status } },
        element("th", { text: file.name, attrs: { scope: "row" } }),
        element("td", { className: `status status-${file.status}`, text: file.status }),
        element("td", {}, progress),
        element("td", { text: String(file.attempts) }),
        element("td", { className: "error", text: file.error || "" }),
        downloads);
    });
    const table = element("table", { className: "files" },
      element("caption", { text: "Files" }),
      element("thead", {}, element("tr", {}, ...["File", "Status", "Progress", "Attempts", "Error", "Download"]
        .map((name) => element("th", { text: name, attrs: { scope: "col" } })))),
      element("tbody", {}, ...rows));
    detail.replaceChildren(head, element("div", { className: "table-scroll" }, table));
  }

  async function download(job, file, label, format) {
    try {
      const response = await call(`v1/jobs/${encodeURIComponent(job.id)}/files/${encodeURIComponent(file.id)}`
        + `/result?format=${format}`);
      const url = URL.createObjectURL(await response.blob());
      const link = element("a", { attrs: { href: url, download: `${file.name.replace(/\.[^.]*$/, "")}.${label}` } });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      status.textContent = `Could not download ${file.name}: ${describe(error)}`;
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = [...form.elements.files.files];
    if (!files.length) {
      status.textContent = "Choose one or more audio files.";
      return;
    }
    const body = new FormData();
    for (const file of files) body.append("file", file, file.name);
    body.append("model", form.elements.engine.value || config.default_model);
    body.append("language", form.elements.language.value);
    body.append("channels", form.elements.channels.value);
    body.append("speaker", String(form.elements.speaker.checked));
    body.append("itn", String(form.elements.itn.checked));
    status.textContent = `Submitting ${files.length} file${files.length === 1 ? "" : "s"}…`;
    try {
      const job = await callJson("v1/jobs", { method: "POST", body });
      status.textContent = `Submitted job ${job.id}.`;
      form.elements.files.value = "";
      selected = job.id;
      await refresh();
    } catch (error) {
      status.textContent = `Could not submit: ${describe(error)}`;
    }
  });
  document.getElementById("j-refresh").addEventListener("click", refresh);
  return {
    show() {
      shown = true;
      refresh();
    },
    hide() {
      shown = false;
      clearTimeout(timer);
    },
  };
}
