// The console's few behaviours: the API token, the action buttons, the
// live log, counting elapsed times, and refreshing the home page. Text
// from the service is only ever set as text (textContent, append), never
// as HTML.
"use strict";
(function () {
  const KEY = "claude-flow-api-token";
  const tokens = window.sessionStorage;
  const $ = (id) => document.getElementById(id);

  function say(text, ok) {
    const out = $("action-result");
    out.textContent = text;
    out.className = ok ? "ok" : "failed";
  }

  function showToken() {
    const has = Boolean(tokens.getItem(KEY));
    $("token-state").textContent = has ? "actions enabled" : "read-only";
    $("token-forget").hidden = !has;
    $("token-input").value = "";
    document.body.classList.toggle("authorised", has);
  }

  $("token").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (value) tokens.setItem(KEY, value);
    showToken();
  });
  $("token-forget").addEventListener("click", () => {
    tokens.removeItem(KEY);
    showToken();
  });
  showToken();

  async function act(button) {
    const token = tokens.getItem(KEY);
    const what = button.textContent;
    if (!token) {
      say(what + ": enter the API token above first; actions need it.", false);
      $("token-input").focus();
      return;
    }
    button.disabled = true;
    try {
      const answer = await fetch(button.dataset.post, {
        method: "POST",
        headers: { Authorization: "Bearer " + token },
      });
      const body = await answer.json().catch(() => ({}));
      if (answer.ok) {
        say(what + ": done.", true);
        refresh();
      } else {
        say(what + ": " + answer.status + " " + (body.error || answer.statusText), false);
        if (answer.status === 401) {
          tokens.removeItem(KEY);
          showToken();
        }
      }
    } catch (error) {
      say(what + ": " + error, false);
    }
    button.disabled = false;
  }

  function span(seconds) {
    const h = Math.floor(seconds / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = seconds % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
  }

  function bind(root) {
    for (const button of root.querySelectorAll("button[data-post]")) {
      button.addEventListener("click", () => act(button));
    }
  }

  // The service's clock minus the browser's, at load.
  const served = Number(document.body.dataset.now);
  const skew = served > 0 ? served - Date.now() / 1000 : 0;
  setInterval(() => {
    const now = Date.now() / 1000 + skew;
    for (const e of document.querySelectorAll(".elapsed[data-since]")) {
      e.textContent = span(Math.max(0, Math.floor(now - Number(e.dataset.since))));
    }
  }, 1000);

  // Replaces the page's main part with a fresh copy: no flicker, and the
  // token field keeps what is being typed. DOMParser runs no scripts.
  async function refresh() {
    try {
      const answer = await fetch(location.href, { cache: "no-store" });
      if (!answer.ok) return;
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
      const main = fresh.querySelector("main");
      if (!main || $("live-log")) {
        location.reload();
        return;
      }
      document.querySelector("main").replaceWith(main);
      bind(main);
    } catch (error) {
      // The service may be restarting: the next round will tell.
    }
  }

  const every = Number(document.body.dataset.refresh || 0);
  if (every > 0) setInterval(refresh, every * 1000);

  bind(document);

  // A log's last lines matter most: show the end of each.
  for (const pre of document.querySelectorAll("pre.log")) {
    pre.scrollTop = pre.scrollHeight;
    const details = pre.closest("details");
    if (details) details.addEventListener("toggle", () => { pre.scrollTop = pre.scrollHeight; });
  }

  const log = $("live-log");
  if (log) {
    const state = $("live-state");
    const source = new EventSource(log.dataset.src);
    source.addEventListener("open", () => {
      state.textContent = "following the log as the workflow writes it";
    });
    source.addEventListener("log", (event) => {
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      log.append(event.data + "\n");
      if (log.textContent.length > 2000000) {
        log.textContent = log.textContent.slice(-1000000);
      }
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("end", (event) => {
      source.close();
      state.textContent = "The attempt is over: " + event.data + ".";
      setTimeout(() => location.reload(), 2000);
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CONNECTING) state.textContent = "reconnecting…";
    });
  }
})();
