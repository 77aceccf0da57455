// The page served at GET /: a client that subscribes the way LNbits front ends do, shows what
// arrives, and pushes a message through the HTTP API.
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
<form id="push"><input id="data" placeholder="message" size="40" required> <button>Push</button></form>
<p>Or from a shell: <code id="curl"></code></p>
<ul id="log"></ul>
<script>
"use strict";
let ws = null;
const $ = (id) => document.getElementById(id);

function show(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + "  " + text;
  $("log").prepend(li);
}

function subscribe() {
  if (ws) ws.close();
  const id = encodeURIComponent($("id").value);
  // As in the LNbits docs: wss: whenever the page itself is not plain http:.
  const scheme = location.protocol !== "http:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/api/v1/ws/" + id);
  $("state").textContent = "connecting";
  ws.addEventListener("open", () => { $("state").textContent = "connected"; });
  ws.addEventListener("close", (e) => { $("state").textContent = "closed (" + e.code + ")"; });
  ws.addEventListener("message", ({ data }) => show(data));
  $("curl").textContent = "curl -X POST " + location.origin + "/api/v1/ws/" + id + " -d 'hello'";
}

$("subscribe").addEventListener("click", subscribe);
$("push").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = encodeURIComponent($("id").value);
  const res = await fetch("/api/v1/ws/" + id, { method: "POST", body: $("data").value });
  const answer = await res.json();
  $("state").textContent = res.ok ? "pushed to " + answer.connections + " connection(s)" : answer.detail;
});
subscribe();
</script>
</body>
</html>
)html";

}  // namespace wsbroadcast_server
