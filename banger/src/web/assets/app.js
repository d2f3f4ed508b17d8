// banger web: draws the page from the state banger sends on /api/events
// (the live model, pushed whenever it changes) and makes the calls behind
// the buttons. No third-party code; the Content-Security-Policy allows
// nothing but this file and style.css.
"use strict";

const page = document.body.dataset.page;
const pageId = document.body.dataset.id;
const csrf = document.querySelector('meta[name="csrf"]').content;
const main = document.getElementById("main");
const daemon = document.getElementById("daemon");

let state = null;
// Set when the page is left: background reads stop.
let leaving = false;
// The job page keeps the last it saw of its job once the daemon lets it go.
let lastJob = null;
let notice = null;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

// Replace an element's content only when it changed, so a redraw with
// nothing new leaves the page (and a button under the pointer) alone.
function put(element, html) {
  if (element.dataset.html !== html) {
    element.dataset.html = html;
    element.innerHTML = html;
  }
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? `${v} B` : `${v >= 10 ? v.toFixed(0) : v.toFixed(1)} ${units[u]}`;
}

function duration(usec) {
  const s = usec / 1e6;
  if (s < 1) return `${Math.round(usec / 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function pace(job) {
  const parts = [];
  if (job.rate) parts.push(`${bytes(Math.round(job.rate))}/s`);
  if (job.eta_secs !== null && job.eta_secs !== undefined) parts.push(`${Math.max(1, job.eta_secs)} s left`);
  return parts.join(", ") || job.detail || "";
}

function outcomeText(job) {
  if (!job.outcome) return job.state;
  if (job.outcome.success) return "succeeded";
  return job.outcome.error_name.endsWith(".Cancelled") ? "cancelled" : "failed";
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-banger-csrf": csrf },
    body: JSON.stringify(body ?? {}),
  });
  let data = {};
  try { data = await response.json(); } catch (e) { /* an empty or HTML body */ }
  if (!response.ok) throw new Error(data.message || `${response.status} ${response.statusText}`);
  return data;
}

function say(text, error) {
  notice = { text, error };
  const box = document.getElementById("notice");
  if (box) {
    box.textContent = text;
    box.className = error ? "notice error" : "notice";
  }
}

async function act(url, body, what) {
  try {
    const data = await post(url, body);
    say(`${what}: ${data.job ? `job ${data.job} started` : "done"}`, false);
    return data;
  } catch (e) {
    say(`cannot ${what}: ${e.message}`, true);
    return null;
  }
}

// A delete button asks once more: the first click arms it for a few
// seconds (kept across redraws), the second deletes.
let armed = null;

function deleteButton(act, id, name) {
  const key = `${act}:${id}`;
  const on = armed === key;
  return `<button class="danger${on ? " armed" : ""}" data-act="${act}" data-action="delete" data-id="${esc(id)}" data-name="${esc(name)}">${on ? "really delete?" : "delete"}</button>`;
}

function vmButtons(vm) {
  const b = (action, label) =>
    `<button data-act="vm" data-action="${action}" data-id="${esc(vm.id)}" data-name="${esc(vm.name)}">${label}</button>`;
  return b("start", "start") + b("stop", "stop") + b("restart", "restart") + deleteButton("vm", vm.id, vm.name);
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-act]");
  if (!button) return;
  const d = button.dataset;
  if (button.classList.contains("danger") && !button.classList.contains("armed")) {
    const key = `${d.act}:${d.id}`;
    armed = key;
    if (state) current.update();
    setTimeout(() => {
      if (armed === key) { armed = null; if (state) current.update(); }
    }, 4000);
    return;
  }
  armed = null;
  button.disabled = true;
  try {
    if (d.act === "vm") {
      await act(`/api/vm/${d.id}/${d.action}`, {}, `${d.action} vm ${d.name}`);
    } else if (d.act === "delete-image" || d.act === "delete-kernel") {
      const what = d.act === "delete-image" ? "image" : "kernel";
      await act(`/api/${what}/${d.id}/delete`, {}, `delete ${what} ${d.name}`);
    } else if (d.act === "pull") {
      const data = await act("/api/pull", { kind: d.kind, name: d.name }, `pull ${d.kind} ${d.name}`);
      if (data && data.job) location.href = `/job/${data.job}`;
    } else if (d.act === "cancel") {
      await act(`/api/job/${d.id}/cancel`, {}, `cancel job ${d.id}`);
    } else if (d.act === "copy") {
      await navigator.clipboard.writeText(d.text);
      say("copied", false);
    }
  } finally {
    button.disabled = false;
  }
});

function jobRows(jobs) {
  return jobs.map((j) => `<tr>
      <td><a href="/job/${esc(j.id)}">${esc(j.id)}</a></td><td>${esc(j.kind)}</td>
      <td class="state-${esc(outcomeText(j))}">${esc(outcomeText(j))}</td><td>${esc(j.stage)}</td>
      <td><progress max="1" value="${j.fraction}"></progress> ${Math.round(j.fraction * 100)}%</td>
      <td>${esc(j.outcome && !j.outcome.success ? j.outcome.message : pace(j))}</td>
      <td>${j.running ? `<button data-act="cancel" data-id="${esc(j.id)}">cancel</button>` : ""}</td>
    </tr>`).join("");
}

const JOB_HEAD = "<tr><th>job</th><th>kind</th><th>state</th><th>stage</th><th>progress</th><th></th><th></th></tr>";

const pages = {
  dashboard: {
    mount: () => `<h1>VMs</h1><div id="notice" class="notice"></div><div id="vms"></div><h2>Running jobs</h2><div id="running"></div>`,
    update() {
      const vms = state.vms;
      put(document.getElementById("vms"), vms.length === 0
        ? `<p class="muted">no VMs: <a href="/create">create one</a></p>`
        : `<table id="vm-table"><thead><tr><th>name</th><th>state</th><th>IPv4</th><th>vCPUs</th><th>memory</th><th>CPU</th><th>RSS</th><th>disk</th><th>NAT</th><th>image</th><th></th></tr></thead><tbody>` +
          vms.map((vm) => `<tr data-vm="${esc(vm.name)}">
            <td><a href="/vm/${esc(vm.id)}">${esc(vm.name)}</a></td>
            <td class="state-${esc(vm.state)}">${esc(vm.state)}</td>
            <td>${esc(vm.ipv4 || "-")}</td><td>${vm.vcpus}</td><td>${bytes(vm.memory_mib * 1048576)}</td>
            <td>${vm.cpu_percent === null ? "-" : `${Math.round(vm.cpu_percent)}%`}</td><td>${bytes(vm.rss_bytes)}</td>
            <td>${bytes(vm.disk_bytes)}</td><td>${vm.nat ? "on" : "-"}</td><td>${esc(vm.image)}</td>
            <td class="actions">${vmButtons(vm)}</td></tr>`).join("") + "</tbody></table>");
      const running = state.jobs.filter((j) => j.running);
      put(document.getElementById("running"), running.length === 0
        ? `<p class="muted">none</p>`
        : `<table>${JOB_HEAD}${jobRows(running)}</table>`);
    },
  },

  vm: {
    mount: () => `<div id="vm"></div><div id="notice" class="notice"></div><h2>Console</h2><pre id="console" class="console"></pre>`,
    update() {
      const vm = state.vms.find((v) => v.id === pageId);
      const box = document.getElementById("vm");
      if (!vm) {
        put(box, `<h1>VM gone</h1><p class="muted">no VM with id ${esc(pageId)}: <a href="/">all VMs</a></p>`);
        return;
      }
      const ssh = `banger vm ssh ${vm.name}`;
      put(box, `<h1>vm ${esc(vm.name)} <span class="state-${esc(vm.state)}">${esc(vm.state)}</span></h1>
        <p class="actions">${vmButtons(vm)}</p>
        <dl>
          <dt>IPv4</dt><dd>${esc(vm.ipv4 || "-")}</dd><dt>MAC</dt><dd>${esc(vm.mac)}</dd>
          <dt>vCPUs</dt><dd>${vm.vcpus}</dd><dt>memory</dt><dd>${bytes(vm.memory_mib * 1048576)}</dd>
          <dt>CPU</dt><dd>${vm.cpu_percent === null ? "-" : `${Math.round(vm.cpu_percent)}%`}</dd><dt>RSS</dt><dd>${bytes(vm.rss_bytes)}</dd>
          <dt>disk</dt><dd>${bytes(vm.disk_bytes)}</dd><dt>NAT</dt><dd>${vm.nat ? "on" : "off"}</dd>
          <dt>image</dt><dd>${esc(vm.image)}</dd><dt>id</dt><dd>${esc(vm.id)}</dd>
          ${vm.last_error ? `<dt>last error</dt><dd class="error">${esc(vm.last_error)}</dd>` : ""}
          <dt>SSH</dt><dd><code id="ssh">${esc(ssh)}</code> <button data-act="copy" data-text="${esc(ssh)}">copy</button></dd>
        </dl>`);
    },
    started() { followConsole(); },
  },

  create: {
    mount: () => `<h1>Create a VM</h1><div id="notice" class="notice"></div>
      <form id="create-form">
        <label>name <input name="name" id="f-name" placeholder="a fresh name when empty" maxlength="64"></label>
        <label>image <select name="image" id="f-image"><option value="">(the default image)</option></select></label>
        <label>vCPUs <input name="vcpus" id="f-vcpus" type="number" min="1" placeholder="default"></label>
        <label>memory MiB <input name="memory_mib" id="f-memory" type="number" min="64" placeholder="default"></label>
        <label>disk <input name="disk" id="f-disk" placeholder="default, e.g. 8G"></label>
        <label class="check"><input name="nat" id="f-nat" type="checkbox"> NAT (reach the internet)</label>
        <button type="submit" id="f-create">create</button>
      </form>`,
    update() {
      const select = document.getElementById("f-image");
      const chosen = select.value;
      select.innerHTML = `<option value="">(the default image)</option>` +
        state.images.map((i) => `<option value="${esc(i.id)}">${esc(i.name)}</option>`).join("");
      select.value = chosen;
    },
    started() {
      document.getElementById("create-form").addEventListener("submit", async (event) => {
        event.preventDefault();
        const f = event.target;
        const number = (v) => (v === "" ? null : Number(v));
        const data = await act("/api/create", {
          name: f.name.value.trim(), image: f.image.value, vcpus: number(f.vcpus.value),
          memory_mib: number(f.memory_mib.value), disk: f.disk.value.trim(), nat: f.nat.checked,
        }, `create vm ${f.name.value.trim() || "(a fresh name)"}`);
        if (data && data.job) location.href = `/job/${data.job}`;
      });
    },
  },

  images: {
    mount: () => `<h1>Images</h1><div id="notice" class="notice"></div><div id="list"></div><h2>Pull from the catalog</h2><div id="catalog" class="muted">loading the catalog…</div>`,
    update() {
      put(document.getElementById("list"), state.images.length === 0
        ? `<p class="muted">no images: pull one below</p>`
        : `<table><tr><th>name</th><th>id</th><th>size</th><th>kernel</th><th>managed</th><th></th></tr>` +
          state.images.map((i) => `<tr><td>${esc(i.name)}</td><td><code>${esc(i.id.slice(0, 12))}</code></td>
            <td>${bytes(i.rootfs_bytes)}</td><td>${esc(i.kernel || "-")}</td><td>${i.managed ? "yes" : "no"}</td>
            <td>${deleteButton("delete-image", i.id, i.name)}</td></tr>`).join("") +
          "</table>");
    },
    started() { loadCatalog("images", "image"); },
  },

  kernels: {
    mount: () => `<h1>Kernels</h1><div id="notice" class="notice"></div><div id="list"></div><h2>Pull from the catalog</h2><div id="catalog" class="muted">loading the catalog…</div>`,
    update() {
      put(document.getElementById("list"), state.kernels.length === 0
        ? `<p class="muted">no kernels: pull one below</p>`
        : `<table><tr><th>name</th><th>version</th><th>id</th><th>size</th><th></th></tr>` +
          state.kernels.map((k) => `<tr><td>${esc(k.name)}</td><td>${esc(k.version)}</td><td><code>${esc(k.id.slice(0, 12))}</code></td>
            <td>${bytes(k.size_bytes)}</td>
            <td>${deleteButton("delete-kernel", k.id, k.name)}</td></tr>`).join("") +
          "</table>");
    },
    started() { loadCatalog("kernels", "kernel"); },
  },

  jobs: {
    mount: () => `<h1>Jobs</h1><div id="notice" class="notice"></div><div id="list"></div>`,
    update() {
      put(document.getElementById("list"), state.jobs.length === 0
        ? `<p class="muted">no jobs running or just finished</p>`
        : `<table>${JOB_HEAD}${jobRows(state.jobs)}</table>`);
    },
  },

  job: {
    mount: () => `<div id="job"></div><div id="notice" class="notice"></div>`,
    update() {
      const job = state.jobs.find((j) => j.id === pageId) || lastJob;
      const box = document.getElementById("job");
      if (!job) {
        put(box, `<h1>job ${esc(pageId)}</h1><p class="muted">not running and not recently finished (<code>banger job show ${esc(pageId)}</code> tells how it ended)</p>`);
        return;
      }
      lastJob = job;
      const result = outcomeText(job);
      const stages = job.stages.map(([name, usec]) =>
        `<li class="done" data-stage="${esc(name)}">✓ ${esc(name)} <span class="muted">${duration(usec)}</span></li>`).join("");
      const current = job.running && job.stage && !job.stages.some(([name]) => name === job.stage)
        ? `<li class="current" data-stage="${esc(job.stage)}">→ ${esc(job.stage)} <progress max="1" value="${job.fraction}"></progress> <span class="muted">${esc(pace(job))}</span></li>`
        : "";
      const end = job.outcome
        ? (job.outcome.success
          ? `<p class="ok" id="outcome">succeeded${job.result_vm ? ` · <a href="/vm/${esc(job.result_vm)}">open the VM</a>` : ""}</p>`
          : `<p class="error" id="outcome">${esc(result)}: ${esc(job.outcome.message)}</p>`)
        : `<p><button data-act="cancel" data-id="${esc(job.id)}">cancel</button></p>`;
      put(box, `<h1>job ${esc(job.id)} <span class="muted">${esc(job.kind)}</span> <span class="state-${esc(result)}">${esc(result)}</span></h1>
        <p><progress max="1" value="${job.fraction}"></progress> ${Math.round(job.fraction * 100)}%</p>
        <ol class="stages">${stages}${current}</ol>${end}`);
    },
  },
};

async function loadCatalog(kind, one) {
  const box = document.getElementById("catalog");
  try {
    const response = await fetch(`/api/available/${kind}`, { credentials: "same-origin" });
    const entries = await response.json();
    if (!response.ok) throw new Error(entries.message || response.statusText);
    box.className = "";
    put(box, entries.length === 0 ? `<p class="muted">the catalog is empty</p>`
      : `<table><tr><th>name</th><th>size</th><th>description</th><th></th></tr>` +
        entries.map((e) => `<tr><td>${esc(e.name)}</td><td>${bytes(e.size)}</td><td>${esc(e.description)}</td>
          <td>${e.installed ? "installed" : e.usable ? `<button data-act="pull" data-kind="${one}" data-name="${esc(e.name)}">pull</button>` : "needs a newer banger"}</td></tr>`).join("") +
        "</table>");
  } catch (e) {
    box.textContent = `cannot list the catalog: ${e.message}`;
  }
}

// The console log, read from where the last read ended, once a second.
let consoleOffset = 0;

async function followConsole() {
  const pre = document.getElementById("console");
  while (!leaving) {
    const offset = consoleOffset;
    try {
      const response = await fetch(`/api/vm/${pageId}/console?offset=${offset}`, { credentials: "same-origin" });
      if (response.ok) {
        const data = await response.json();
        if (data.text) {
          const follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.textContent = (pre.textContent + data.text).slice(-200000);
          if (follow) pre.scrollTop = pre.scrollHeight;
        }
        consoleOffset = data.next;
        if (data.text && data.text.length > 0) continue;
      }
    } catch (e) { /* the server went away; try again */ }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

const current = pages[page] || pages.dashboard;
main.innerHTML = current.mount();
if (current.started) current.started();
if (notice) say(notice.text, notice.error);

// One event stream per page. A browser gives a server only a few HTTP/1
// connections, so the stream (and the console reads) stop when the page
// is left, also when the browser keeps it in its back/forward cache.
let events = null;

function listen() {
  events = new EventSource("/api/events");
  events.addEventListener("state", (event) => {
    state = JSON.parse(event.data);
    daemon.textContent = state.connected ? "● bangerd" : `○ bangerd away${state.gone ? `: ${state.gone}` : ""}`;
    daemon.className = state.connected ? "up" : "down";
    current.update();
    document.body.dataset.ready = "1";
  });
  events.addEventListener("error", () => {
    daemon.textContent = "○ banger web is not answering";
    daemon.className = "down";
  });
}

window.addEventListener("pagehide", () => {
  leaving = true;
  if (events) events.close();
});
window.addEventListener("pageshow", (event) => {
  if (event.persisted) {
    leaving = false;
    listen();
    if (page === "vm") followConsole();
  }
});
listen();
