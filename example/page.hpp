// The page served at GET /: a client that subscribes the way LNbits front ends do, reconnects with
// backoff when the server goes away, shows its state and what arrives, and pushes a message through
// the HTTP API.
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
<form id="push"><input id="data" placeholder="message" size="40" required> <button>Push</button>
  <span id="pushed"></span></form>
<p>Or from a shell: <code id="curl"></code></p>
<ul id="log"></ul>
<script>
"use strict";
// One socket at a time. When it closes without being asked to, try again after 1 s, 2 s, 4 s ...
// up to 30 s; a successful open resets the delay.
let ws = null;
let retries = 0;
let retryTimer = null;
const $ = (id) => document.getElementById(id);

function setState(name, text) {
  $("state").dataset.state = name;  // connecting | connected | reconnecting
  $("state").textContent = text || name;
}

function show(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  $("log").prepend(li);
}

function connect() {
  clearTimeout(retryTimer);
  if (ws) { ws.onclose = null; ws.close(); }
  const id = encodeURIComponent($("id").value);
  // As in the LNbits docs: wss: whenever the page itself is not plain http:.
  const scheme = location.protocol !== "http:" ? "wss://" : "ws://";
  const socket = new WebSocket(scheme + location.host + "/api/v1/ws/" + id);
  ws = socket;
  setState("connecting");
  socket.onopen = () => { retries = 0; setState("connected"); };
  socket.onmessage = ({ data }) => show(data);
  socket.onclose = (e) => {
    if (ws !== socket) return;  // replaced by a newer subscription
    const delay = Math.min(30000, 1000 * 2 ** retries++);
    setState("reconnecting", "closed (" + e.code + "), reconnecting in " + delay / 1000 + " s");
    retryTimer = setTimeout(connect, delay);
  };
  $("curl").textContent = "curl -X POST " + location.origin + "/api/v1/ws/" + id + " -d 'hello'";
}

$("subscribe").addEventListener("click", () => { retries = 0; connect(); });
$("push").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = encodeURIComponent($("id").value);
  const res = await fetch("/api/v1/ws/" + id, { method: "POST", body: $("data").value });
  const answer = await res.json();
  $("pushed").textContent = res.ok ? "pushed to " + answer.connections + " connection(s)" : answer.detail;
});
connect();
</script>
</body>
</html>
)html";

}  // namespace wsbroadcast_server
