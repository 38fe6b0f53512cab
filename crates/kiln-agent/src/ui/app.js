// The kiln dashboard's only script: follow the live view (server-sent
// events) and send the buttons' commands to the JSON API, with the
// anti-forgery value the page was rendered with.
"use strict";
const csrf = document.querySelector('meta[name="kiln-csrf"]').content;
const view = document.getElementById("view");
const notice = document.createElement("p");
notice.setAttribute("role", "status");
notice.className = "notice";
view.before(notice);

new EventSource("/ui/events").addEventListener("view", (e) => {
  view.innerHTML = e.data;
});

view.addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-action]");
  if (!b) return;
  const { service, action, to } = b.dataset;
  b.disabled = true;
  notice.textContent = `${action} ${service}…`;
  try {
    const r = await fetch(`/v1/services/${encodeURIComponent(service)}/${action}`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-kiln-csrf": csrf },
      body: action === "rollback" ? JSON.stringify({ to: Number(to) }) : undefined,
      credentials: "same-origin",
    });
    const body = await r.json().catch(() => ({}));
    notice.textContent = r.ok
      ? `${action} ${service}: done`
      : `${action} ${service} refused: ${body.error || r.status}`;
  } catch (err) {
    notice.textContent = `${action} ${service} failed: ${err}`;
  } finally {
    b.disabled = false;
  }
});
