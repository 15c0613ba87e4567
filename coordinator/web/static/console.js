// The saga console's script: confirmation dialogs, actions posted in place, live updates.
// Every piece of HTML it inserts was rendered (and escaped) by the server; text it makes
// itself goes through textContent only.
"use strict";

function notify(text) {
  const notice = document.getElementById("notice");
  if (!notice) return;
  notice.textContent = text;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { notice.textContent = ""; }, 8000);
}

// --- confirmations and actions ------------------------------------------------------------

function openDialog(button) {
  const dialog = document.getElementById(button.dataset.dialog);
  if (!dialog || button.disabled) return;
  dialog.showModal();
  const reason = dialog.querySelector("[data-reason]");
  if (reason) reason.focus();
}

async function postAction(form) {
  const error = form.querySelector("[data-form-error]");
  const confirm = form.querySelector("[data-confirm]");
  error.textContent = "";
  confirm.disabled = true;
  try {
    const response = await fetch(form.getAttribute("action"), {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      headers: { "Accept": "application/json" },
      credentials: "same-origin",
    });
    let answer;
    try {
      answer = await response.json();
    } catch (_) {
      answer = { ok: false, error: `the console answered ${response.status}` };
    }
    if (!answer.ok) {
      error.textContent = answer.error;
      return;
    }
    form.closest("dialog").close();
    notify(answer.message);
  } catch (failure) {
    error.textContent = `the console could not be reached (${failure})`;
  } finally {
    confirm.disabled = false;
  }
}

document.addEventListener("click", (event) => {
  const opener = event.target.closest("button[data-dialog]");
  if (opener) {
    openDialog(opener);
    return;
  }
  const closer = event.target.closest("[data-close]");
  if (closer) closer.closest("dialog").close();
});

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form.action-form");
  if (!form) return;
  event.preventDefault();
  if (!form.reportValidity()) return;
  postAction(form);
});

// --- live pages ---------------------------------------------------------------------------

function replaceFragments(root, fragments) {
  const focused = document.activeElement;
  const dialogOpen = root.querySelector("dialog[open]");
  for (const [name, html] of Object.entries(fragments)) {
    const target = root.querySelector(`[data-fragment="${name}"]`);
    if (!target) continue;
    // An open confirmation keeps what is being typed: its section is refreshed once it closes.
    if (dialogOpen && target.contains(dialogOpen)) {
      dialogOpen.addEventListener("close", () => { target.innerHTML = html; }, { once: true });
      continue;
    }
    const hadFocus = target.contains(focused);
    const openSteps = [...target.querySelectorAll("details[open] .step-name")].map((n) => n.textContent);
    target.innerHTML = html;
    for (const details of target.querySelectorAll("details")) {
      const name = details.querySelector(".step-name");
      if (name && openSteps.includes(name.textContent)) details.open = true;
    }
    if (hadFocus) {
      const first = target.querySelector("button:not([disabled]), a, [tabindex]");
      if (first) first.focus();
    }
  }
}

function followSaga(root) {
  const source = new EventSource(root.dataset.liveSaga);
  source.addEventListener("saga", (message) => {
    const data = JSON.parse(message.data);
    replaceFragments(root, data.html);
    root.dataset.state = data.state;
    root.dataset.version = String(data.version);
  });
  source.addEventListener("end", (message) => {
    const data = JSON.parse(message.data);
    root.dataset.state = data.state;
    source.close();
  });
  window.addEventListener("pagehide", () => source.close());
}

async function loadCounts(root) {
  const pending = root.querySelector("[data-load-counts]");
  if (!pending) return;
  try {
    const response = await fetch(pending.dataset.loadCounts, { headers: { "Accept": "application/json" } });
    const answer = await response.json();
    if (!response.ok) {
      pending.querySelector("p").textContent = answer.error || `the console answered ${response.status}`;
      return;
    }
    pending.innerHTML = answer.html;
    pending.removeAttribute("aria-busy");
  } catch (failure) {
    pending.querySelector("p").textContent = `the counts could not be read (${failure})`;
  }
}

function followList(root) {
  loadCounts(root);
  const source = new EventSource(root.dataset.liveList);
  let fresh = 0;
  source.addEventListener("change", (message) => {
    const change = JSON.parse(message.data);
    for (const row of root.querySelectorAll("tr[data-saga-id]")) {
      if (row.dataset.sagaId !== change.saga_id) continue;
      const state = row.querySelector("[data-state]");
      state.textContent = change.state;
      state.className = `state ${change.state_class}`;
      row.querySelector("[data-updated]").textContent = change.time;
      row.classList.remove("changed");
      void row.offsetWidth;
      row.classList.add("changed");
    }
    if (change.new) {
      fresh += 1;
      const banner = root.querySelector("[data-new-sagas]");
      banner.querySelector("[data-new-count]").textContent = String(fresh);
      banner.hidden = false;
    }
  });
  source.addEventListener("counts", (message) => {
    const target = root.querySelector('[data-fragment="counts"]');
    target.innerHTML = JSON.parse(message.data).html;
  });
  source.addEventListener("resync", (message) => {
    notify(JSON.parse(message.data).why);
  });
  window.addEventListener("pagehide", () => source.close());
}

async function loadParts(root) {
  const pending = root.querySelector("[data-load-parts]");
  if (!pending) return;
  try {
    const response = await fetch(pending.dataset.loadParts, { headers: { "Accept": "application/json" } });
    const answer = await response.json();
    if (!response.ok) {
      pending.querySelector("p").textContent = answer.error || `the console answered ${response.status}`;
      return;
    }
    // A live update may have brought newer parts meanwhile: keep the newest.
    if (Number(root.dataset.version || 0) > answer.version) return;
    replaceFragments(root, answer.html);
  } catch (failure) {
    pending.querySelector("p").textContent = `the timeline could not be read (${failure})`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const saga = document.querySelector("[data-live-saga]");
  if (saga) {
    loadParts(saga);
    followSaga(saga);
  }
  const list = document.querySelector("[data-live-list]");
  if (list) followList(list);
});
