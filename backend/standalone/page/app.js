// The web page of the standalone service: sign in, schedule, watch progress, see, download and delete images.
// Everything goes through the same API as any other client (ocs/v2.php/text2image); errors are shown as it gives them.
"use strict";

const API = "ocs/v2.php/text2image/";
const APP_ID = "web";
const STATUS = { 0: "unknown", 1: "scheduled", 2: "running", 3: "done", 4: "failed" };
const POLL_MS = 400;
const $ = (id) => document.getElementById(id);
const polling = new Map(); // task id -> timer
let auth = sessionStorage.getItem("t2i-auth");

function base64(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  bytes.forEach((b) => { binary += String.fromCharCode(b); });
  return btoa(binary);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, path, body) {
  // X-Requested-With keeps the browser's own basic-auth dialog away when a secret is wrong.
  const headers = { "OCS-APIRequest": "true", "X-Requested-With": "XMLHttpRequest" };
  if (auth) headers.Authorization = auth;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const type = reply.headers.get("Content-Type") || "";
  if (type.startsWith("image/")) {
    if (!reply.ok) throw new ApiError(reply.status, `HTTP ${reply.status}`);
    return reply.blob();
  }
  let data = null;
  try { data = await reply.json(); } catch (e) { /* not JSON: reported below */ }
  const meta = data && data.ocs && data.ocs.meta;
  if (!reply.ok) throw new ApiError(reply.status, (meta && meta.message) || `HTTP ${reply.status} ${reply.statusText}`);
  return data.ocs.data;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? `${error.status ? error.status + ": " : ""}${error.message}` : "";
  box.hidden = !error;
  if (error && error.status === 401) signOut("Your sign-in was refused: " + error.message);
}

async function availability() {
  try {
    const data = await call("GET", "is_available");
    $("availability").textContent = data.isAvailable ? "A model is loaded and ready." : "No model is ready yet (it may still be loading).";
  } catch (e) {
    $("availability").textContent = "The service does not answer: " + e.message;
  }
}

function signOut(message) {
  auth = null;
  sessionStorage.removeItem("t2i-auth");
  sessionStorage.removeItem("t2i-user");
  polling.forEach((timer) => clearTimeout(timer));
  polling.clear();
  $("tasks").replaceChildren();
  $("app").hidden = true;
  $("signin").hidden = false;
  if (message) {
    let note = $("signin-error");
    if (!note) {
      note = document.createElement("p");
      note.id = "signin-error";
      note.className = "error";
      note.setAttribute("role", "alert");
      $("signin").append(note);
    }
    note.textContent = message;
  }
}

async function signIn(event) {
  event.preventDefault();
  const user = $("user").value.trim();
  const secret = $("secret").value;
  auth = user ? "Basic " + base64(user + ":" + secret) : "Bearer " + secret;
  try {
    await call("GET", `tasks/app/${APP_ID}`);
  } catch (e) {
    signOut(`${e.status || ""} ${e.message}`.trim());
    return;
  }
  sessionStorage.setItem("t2i-auth", auth);
  sessionStorage.setItem("t2i-user", user || "(token)");
  $("secret").value = "";
  enter();
}

function enter() {
  const note = $("signin-error");
  if (note) note.remove();
  $("who").textContent = sessionStorage.getItem("t2i-user") || "";
  $("signin").hidden = true;
  $("app").hidden = false;
  refresh();
}

function formInput() {
  const body = { input: $("prompt").value, appId: APP_ID, numberOfImages: Number($("numberOfImages").value || 1) };
  const text = ["negative_prompt", "size", "scheduler"];
  const numbers = ["steps", "guidance", "seed"];
  text.forEach((k) => { if ($(k).value) body[k] = $(k).value; });
  numbers.forEach((k) => { if ($(k).value !== "") body[k] = Number($(k).value); });
  return body;
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  try {
    const data = await call("POST", "schedule", formInput());
    render(data.task);
  } catch (e) {
    showError(e);
  } finally {
    $("submit").disabled = false;
  }
}

function taskElement(task) {
  let item = document.getElementById("task-" + task.id);
  if (!item) {
    item = document.createElement("li");
    item.id = "task-" + task.id;
    item.className = "task";
    item.innerHTML = '<div class="meta"></div><p class="prompt"></p><progress max="1" value="0"></progress>' +
      '<p class="error" hidden></p><div class="images"></div><button type="button" class="delete">Delete</button>';
    item.querySelector(".delete").addEventListener("click", () => remove(task.id));
    $("tasks").prepend(item);
  }
  return item;
}

function render(task) {
  $("empty").hidden = true;
  const item = taskElement(task);
  item.dataset.status = STATUS[task.status] || "unknown";
  const options = Object.entries(task.options || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  item.querySelector(".meta").textContent =
    `#${task.id} · ${STATUS[task.status] || task.status} · ${task.numberOfImages} image(s)${options ? " · " + options : ""}`;
  item.querySelector(".prompt").textContent = task.input;
  const bar = item.querySelector("progress");
  bar.value = task.status >= 3 ? 1 : (task.progress || 0);
  bar.hidden = task.status >= 3;
  const problem = item.querySelector(".error");
  problem.hidden = task.status !== 4;
  problem.textContent = task.status === 4 ? (task.errorMessage || "failed") : "";
  if (task.status === 3 && !item.dataset.shown) {
    item.dataset.shown = "1";
    showImages(task, item.querySelector(".images"));
  }
  if (task.status < 3 && !polling.has(task.id)) {
    polling.set(task.id, setTimeout(() => poll(task.id), POLL_MS));
  }
}

async function poll(id) {
  polling.delete(id);
  if (!auth) return;
  try {
    const data = await call("GET", `task/${id}`);
    render(data.task);
  } catch (e) {
    if (e.status === 404) {
      const gone = document.getElementById("task-" + id);
      if (gone) gone.remove();
      return;
    }
    showError(e);
    polling.set(id, setTimeout(() => poll(id), POLL_MS * 5));
  }
}

async function showImages(task, box) {
  for (let i = 0; i < task.numberOfImages; i++) {
    try {
      const blob = await call("GET", `task/${task.id}/image/${i}`);
      const url = URL.createObjectURL(blob);
      const figure = document.createElement("figure");
      const link = document.createElement("a");
      link.href = url;
      link.target = "_blank";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${task.input} (image ${i + 1})`;
      link.append(img);
      const download = document.createElement("a");
      download.href = url;
      download.download = `text2image-${task.id}-${i}.png`;
      download.className = "download";
      download.textContent = "Download";
      figure.append(link, document.createElement("br"), download);
      box.append(figure);
    } catch (e) {
      showError(e);
    }
  }
}

async function remove(id) {
  showError(null);
  try {
    await call("DELETE", `task/${id}`);
    const item = document.getElementById("task-" + id);
    if (item) item.remove();
    $("empty").hidden = $("tasks").children.length > 0;
  } catch (e) {
    showError(e);
  }
}

async function refresh() {
  try {
    const data = await call("GET", `tasks/app/${APP_ID}`);
    data.tasks.sort((a, b) => a.id - b.id).forEach(render);
    $("empty").hidden = data.tasks.length > 0;
  } catch (e) {
    showError(e);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", signIn);
  $("generate").addEventListener("submit", generate);
  $("signout").addEventListener("click", () => signOut());
  $("refresh").addEventListener("click", refresh);
  availability();
  if (auth) enter();
});
