// wsbroadcast.js: a browser client for the wsbroadcast.v1 subprotocol (docs/protocol.md), served by
// the reference server at /wsbroadcast.js. It keeps one WebSocket for many keys, reconnects with
// exponential backoff and full jitter, and resumes every key from the last position it saw, so that
// a dropped connection costs no message; when the server cannot replay what was missed (history
// trimmed, server restarted) it says so through onNotRecovered, and the application reloads its
// state over its own API instead of silently missing something.
//
//   import { connect } from "/wsbroadcast.js";
//   const client = connect({
//     url: "wss://example.com/api/v1/ws",       // or ws://; the bare route, keys come by command
//     keys: { "invoice-42": "last" },            // key -> where to start: "last", a position, or null (now)
//     onMessage: (key, data, position) => { ... },
//     onNotRecovered: (key, reason) => { ... },  // reload this key's state: something may be missing
//     onStatus: (status, detail) => { ... },      // "connecting" | "connected" | "reconnecting"
//   });
//   client.subscribe("wallet-7"); client.unsubscribe("invoice-42"); client.close();
//
// Plain JavaScript, no dependency, for every browser with WebSocket and ES modules.

const protocol = "wsbroadcast.v1";

// "epoch.offset": the same epoch and a larger offset come later; another epoch is another history.
function parsePosition(text) {
  const dot = typeof text === "string" ? text.indexOf(".") : -1;
  if (dot <= 0) return null;
  return { epoch: text.slice(0, dot), offset: Number(text.slice(dot + 1)) };
}

export function connect({
  url,
  keys = {},
  onMessage = () => {},
  onNotRecovered = () => {},
  onStatus = () => {},
  minDelay = 500,
  maxDelay = 30000,
  WebSocketImpl = globalThis.WebSocket,
} = {}) {
  // key -> the position to resume from: the last one seen, or what the caller asked for at first.
  const wanted = new Map(Object.entries(keys));
  let socket = null;
  let attempts = 0;
  let timer = null;
  let closed = false;
  let openedBefore = false;
  // Keys subscribed again after a reconnect without a position: what came meanwhile is unknown.
  const resubscribedBlind = new Set();

  function send(frame) {
    if (socket && socket.readyState === 1) socket.send(JSON.stringify(frame));
  }

  function subscribeFrame(key) {
    const since = wanted.get(key);
    return since ? { type: "subscribe", key, since } : { type: "subscribe", key };
  }

  function seen(key, position) {
    // A message at or before the last one seen is a repeat (a replay overlapping what arrived live).
    const last = parsePosition(wanted.get(key));
    const now = parsePosition(position);
    if (last && now && last.epoch === now.epoch && now.offset <= last.offset) return true;
    if (now) wanted.set(key, position);
    return false;
  }

  function handle(frame) {
    switch (frame.type) {
      case "subscribed": {
        const blind = resubscribedBlind.delete(frame.key);
        if (frame.recovered === false) onNotRecovered(frame.key, frame.reason);
        else if (blind) onNotRecovered(frame.key, "no position to resume from: messages may have been missed");
        if (frame.recovered === true) {
          // The replay follows and moves the position on; "last" is answered by the latest message.
          if (wanted.get(frame.key) === "last") wanted.set(frame.key, null);
        } else if (frame.position) {
          wanted.set(frame.key, frame.position);  // from here on
        }
        break;
      }
      case "message":
        if (!wanted.has(frame.key)) return;  // unsubscribed meanwhile
        if (!seen(frame.key, frame.position)) onMessage(frame.key, frame.data, frame.position);
        break;
      case "error":
        onStatus("error", frame.key ? `${frame.key}: ${frame.reason}` : frame.reason);
        break;
    }
  }

  function open() {
    clearTimeout(timer);
    onStatus(attempts === 0 ? "connecting" : "reconnecting", url);
    const ws = new WebSocketImpl(url, [protocol]);
    socket = ws;
    ws.onopen = () => {
      if (ws.protocol !== protocol) {  // a server without wsbroadcast.v1: nothing here would work
        onStatus("error", `the server did not select ${protocol}`);
        ws.close(1000);
        return;
      }
      attempts = 0;
      onStatus("connected", url);
      resubscribedBlind.clear();
      for (const key of wanted.keys()) {
        if (openedBefore && !wanted.get(key)) resubscribedBlind.add(key);
        send(subscribeFrame(key));
      }
      openedBefore = true;
    };
    ws.onmessage = ({ data }) => {
      try {
        handle(JSON.parse(data));
      } catch (e) {
        onStatus("error", `unreadable frame: ${e.message}`);
      }
    };
    ws.onclose = (event) => {
      if (socket !== ws || closed) return;
      // Full jitter: clients dropped together do not come back together.
      const ceiling = Math.min(maxDelay, minDelay * 2 ** attempts++);
      const delay = Math.round(Math.random() * ceiling);
      onStatus("reconnecting", `closed (${event.code}${event.reason ? " " + event.reason : ""}), retry in ${delay} ms`);
      timer = setTimeout(open, delay);
    };
  }

  open();
  return {
    subscribe(key, since = null) {
      if (wanted.has(key)) return;
      wanted.set(key, since);
      send(subscribeFrame(key));
    },
    unsubscribe(key) {
      if (!wanted.delete(key)) return;
      send({ type: "unsubscribe", key });
    },
    // The positions to resume from, to keep across page loads (sessionStorage) if the app wants.
    positions() {
      return Object.fromEntries(wanted);
    },
    close() {
      closed = true;
      clearTimeout(timer);
      if (socket) socket.close(1000);
    },
  };
}
