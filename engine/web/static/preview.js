/* Live preview of a template as it is edited: posts the form as JSON to the URL in the
   form's data-preview-url (CSRF token in the X-CSRFToken header), debounced, and swaps in
   the panel the server rendered. Without this script the Preview button does the same. */
(function () {
  "use strict";

  var DELAY_MS = 300;
  var form = document.querySelector("form[data-preview-url]");
  var result = document.getElementById("preview-result");
  if (!form || !result || !window.fetch) {
    return;
  }
  var url = form.getAttribute("data-preview-url");
  var status = document.getElementById("preview-status");
  var tokenField = form.querySelector("input[name=csrf_token]");
  var timer = null;
  var sent = 0;
  var controller = null;

  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }

  function fields() {
    var data = {};
    new FormData(form).forEach(function (value, name) {
      if (name !== "csrf_token") {
        data[name] = value;
      }
    });
    return data;
  }

  function show(html) {
    var panel = result.querySelector(".preview-panel");
    var holder = document.createElement("div");
    holder.innerHTML = html; /* rendered and escaped by the server's templates */
    var fresh = holder.querySelector(".preview-panel");
    if (!fresh) {
      return;
    }
    if (panel) {
      panel.replaceWith(fresh);
    } else {
      result.appendChild(fresh);
      Array.prototype.forEach.call(result.querySelectorAll("p.muted"), function (p) {
        p.remove();
      });
    }
  }

  function refresh() {
    var mine = ++sent;
    if (controller) {
      controller.abort();
    }
    controller = window.AbortController ? new AbortController() : null;
    say("Updating the preview…");
    fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "X-CSRFToken": tokenField ? tokenField.value : ""
      },
      body: JSON.stringify(fields()),
      signal: controller ? controller.signal : undefined
    })
      .then(function (response) {
        return response.json().then(function (body) {
          return { ok: response.ok, body: body };
        });
      })
      .then(function (answer) {
        if (mine !== sent) {
          return;
        }
        if (answer.ok && answer.body.html) {
          show(answer.body.html);
          say("Preview up to date.");
        } else {
          var error = answer.body && answer.body.error;
          say(error && error.message ? "No preview: " + error.message : "No preview.");
        }
      })
      .catch(function (error) {
        if (error && error.name === "AbortError") {
          return;
        }
        if (mine === sent) {
          say("The preview is unavailable: use the Preview button.");
        }
      });
  }

  function later() {
    window.clearTimeout(timer);
    timer = window.setTimeout(refresh, DELAY_MS);
  }

  form.addEventListener("input", later);
  form.addEventListener("change", later);
  Array.prototype.forEach.call(form.querySelectorAll(".js-hide"), function (button) {
    button.hidden = true;
  });
  form.setAttribute("data-live", "on");
})();
