// The page served at GET /: a client built on the browser module (/wsbroadcast.js) that
// subscribes to an id, reconnects with backoff and jitter when the server goes away, resumes what it
// missed, shows its state and what arrives, and pushes a message through the HTTP API.
#pragma once

#include <string_view>

namespace wsbroadcast_server {

inline constexpr std::string_view index_html = R"html(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>wsbroadcast</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  input, button { font: inherit; padding: .3rem .5rem; }
  #state { font-weight: bold; }
  #log { list-style: none; padding: 0; font-family: ui-monospace, monospace; }
  #log li { border-bottom: 1px solid #ddd; padding: .25rem 0; word-break: break-all; }
</style>
</head>
<body>
<h1>wsbroadcast</h1>
<p>Subscribed to id <input id="id" value="demo" size="20"> <button id="subscribe">Subscribe</button>
   <span id="state">connecting</span></p>
<form id="push"><input id="data" placeholder="message" size="40" required>
  <input id="token" placeholder="publish token (if set)" size="22" type="password"> <button>Push</button>
  <span id="pushed"></span></form>
<p>Or from a shell: <code id="curl"></code></p>
<ul id="log"></ul>
<script type="module">
// The page is built on the client module the server serves (/wsbroadcast.js, docs/protocol.md):
// one wsbroadcast.v1 socket, reconnecting with backoff and jitter, resuming from the last position
// it saw when the server keeps history (--history-size), and saying so when it cannot.
import { connect } from "/wsbroadcast.js";

const $ = (id) => document.getElementById(id);
let client = null;

function setState(name, text) {
  $("state").dataset.state = name;  // connecting | connected | reconnecting | error
  $("state").textContent = text ? name + ": " + text : name;
}

function show(text, kind = "message") {
  const li = document.createElement("li");
  li.dataset.kind = kind;  // message | notice
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  $("log").prepend(li);
}

function subscribe() {
  if (client) client.close();
  const id = $("id").value;
  // As in the LNbits docs: wss: whenever the page itself is not plain http:.
  const scheme = location.protocol !== "http:" ? "wss://" : "ws://";
  client = connect({
    url: scheme + location.host + "/api/v1/ws",
    keys: { [id]: null },
    onMessage: (key, data) => show(data),
    onNotRecovered: (key, reason) => show("not recovered: " + reason, "notice"),
    onStatus: (status, detail) => setState(status, status === "connected" ? "" : detail),
  });
  $("curl").textContent = "curl -X POST " + location.origin + "/api/v1/ws/" + encodeURIComponent(id) + " -d 'hello'";
}

$("subscribe").addEventListener("click", subscribe);
$("push").addEventListener("submit", async (e) => {
  e.preventDefault();
  const headers = $("token").value ? { Authorization: "Bearer " + $("token").value } : {};
  const res = await fetch("/api/v1/ws/" + encodeURIComponent($("id").value),
                          { method: "POST", body: $("data").value, headers });
  const answer = await res.json();
  if (!res.ok) $("pushed").textContent = answer.detail;
  else if (answer.relayed) $("pushed").textContent = "pushed through Redis to every instance";
  else $("pushed").textContent = "pushed to " + answer.connections + " connection(s)";
});
subscribe();
</script>
</body>
</html>
)html";

}  // namespace wsbroadcast_server
