// The phone simulator, live: polls the page's state every few seconds and redraws the
// list of phones and the open conversation. Without it, the page's Refresh link does.
(function () {
  "use strict";

  const root = document.querySelector(".sim[data-poll]");
  if (!root || !window.fetch) return;
  const url = root.dataset.poll;
  const every = Math.max(1, Number(root.dataset.every) || 3) * 1000;
  const live = document.getElementById("live");
  if (live) live.hidden = false;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawThreads(threads) {
    const list = document.getElementById("threads");
    if (!list || !threads) return;
    if (threads.length === 0) return; // keep the server's explanation
    const items = threads.map(function (t) {
      const li = el("li", t.current ? "current" : "");
      const a = el("a");
      a.href = t.href;
      if (t.current) a.setAttribute("aria-current", "true");
      const who = el("span", "who", t.patient);
      if (t.also && t.also.length) {
        who.append(" ", el("span", "muted", "+" + t.also.length));
      }
      a.append(who, " ", el("span", "num", t.masked));
      if (t.unread) {
        const badge = el("span", "unread", String(t.unread));
        badge.title = "unread texts";
        a.append(" ", badge);
      }
      li.append(a);
      return li;
    });
    list.replaceChildren.apply(list, items);
  }

  function drawMessage(msg) {
    const li = el("li", "bubble " + (msg.direction === "outbound" ? "received" : "sent"));
    li.dataset.sid = msg.sid;
    const text = el("p", "text");
    msg.parts.forEach(function (part) {
      if (part.href) {
        const link = el("a", "", part.text);
        link.href = part.href;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        text.append(link);
      } else {
        text.append(part.text);
      }
    });
    let meta = msg.when;
    if (msg.direction === "inbound" && msg.status !== "received") meta += " · not delivered";
    li.append(text, el("p", "meta", meta));
    return li;
  }

  function drawThread(messages) {
    const list = document.getElementById("thread");
    if (!list || !messages) return;
    const shown = Array.from(list.querySelectorAll("li[data-sid]")).map(function (li) {
      return li.dataset.sid;
    });
    const fresh = messages.map(function (m) { return m.sid; });
    if (shown.join() === fresh.join()) return;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.replaceChildren.apply(list, messages.map(drawMessage));
    if (atBottom || fresh.length > shown.length) list.scrollTop = list.scrollHeight;
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (state) {
        if (!state) return;
        drawThreads(state.threads);
        drawThread(state.messages);
      })
      .catch(function () { /* the next poll tries again */ })
      .finally(function () { window.setTimeout(poll, every); });
  }

  const thread = document.getElementById("thread");
  if (thread) thread.scrollTop = thread.scrollHeight;
  window.setTimeout(poll, every);
})();
