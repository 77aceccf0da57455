// The reference server's page in a real browser (Debian's chromium, headless, driven by
// playwright-core), built on the client module /wsbroadcast.js: open the page for an id, push over
// HTTP, see the message appear; push from another origin (CORS); cut the page's connection (through a TCP proxy the test controls,
// as a dropped Wi-Fi would) while pushes go on, and see the page come back with every message
// exactly once, in order; restart the server on the same port (its history is gone) and see the
// page reconnect by itself, say that it could not recover, and receive again.
//
// usage: node page.test.mjs PATH/TO/wsbroadcast-server SCREENSHOT.png
// Prints "N passed, M failed" last and exits non-zero on any failure. Loopback only; every wait is
// bounded; it stops only the servers it started.
import { spawn } from "node:child_process";
import net from "node:net";
import { chromium } from "playwright-core";

const [serverPath, screenshotPath = "page.png"] = process.argv.slice(2);
if (!serverPath) {
  console.error("usage: node page.test.mjs PATH/TO/wsbroadcast-server [SCREENSHOT.png]");
  process.exit(2);
}
// Set by the test that must run on Debian 12's own Node.js: a run on any other node proves nothing.
const wantNode = process.env.WSBROADCAST_EXPECT_NODE_MAJOR;
if (wantNode && process.versions.node.split(".")[0] !== wantNode) {
  console.error(`this run must be on Node.js ${wantNode}, and it is on ${process.version}`);
  process.exit(1);
}
console.log(`Node.js ${process.version}`);

let passed = 0;
let failed = 0;
function check(ok, what) {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? "PASS" : "FAIL"} ${what}`);
}

// Starts the server and resolves with { child, port } once it prints where it listens.
function startServer(port) {
  return new Promise((resolve, reject) => {
    const args = ["--port", String(port), "--threads", "2", "--history-size", "100"];
    const child = spawn(serverPath, args, { stdio: ["ignore", "pipe", "inherit"] });
    const timer = setTimeout(() => reject(new Error("server did not start within 10 s")), 10000);
    child.stdout.on("data", (chunk) => {
      const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(chunk.toString());
      if (m) {
        clearTimeout(timer);
        resolve({ child, port: Number(m[1]) });
      }
    });
    child.on("exit", (code) => reject(new Error(`server exited early with ${code}`)));
  });
}

function stopServer(child) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), 10000);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve(code);
    });
    child.kill("SIGTERM");
  });
}

// A TCP proxy on loopback in front of the server: cut() drops every connection through it and
// refuses new ones until restore(), which is what the page sees when its network goes away.
function startProxy(targetPort) {
  const sockets = new Set();
  let refusing = false;
  const proxy = net.createServer((client) => {
    if (refusing) return client.destroy();
    const upstream = net.connect(targetPort, "127.0.0.1");
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  return new Promise((resolve) => {
    proxy.listen(0, "127.0.0.1", () =>
      resolve({
        port: proxy.address().port,
        cut() {
          refusing = true;
          for (const s of sockets) s.destroy();
        },
        restore() {
          refusing = false;
        },
        close() {
          for (const s of sockets) s.destroy();
          proxy.close();
        },
      }));
  });
}

// The messages on the page, oldest first, without their time stamps.
async function messages(page) {
  const texts = await page.$$eval('#log li[data-kind="message"]', (items) => items.map((li) => li.textContent));
  return texts.map((t) => t.slice(t.indexOf("  ") + 2)).reverse();  // the page writes "TIME  TEXT"
}

async function push(port, id, text) {
  const res = await fetch(`http://127.0.0.1:${port}/api/v1/ws/${id}`, { method: "POST", body: text });
  return res.json();
}

let server = await startServer(0);
const port = server.port;
const proxy = await startProxy(port);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${proxy.port}/`);
  await page.fill("#id", "browser-test");
  await page.click("#subscribe");
  await page.waitForSelector('#state[data-state="connected"]', { timeout: 10000 });
  check(true, "the page connects to /api/v1/ws/browser-test");

  const first = await push(port, "browser-test", "first message");
  check(first.connections === 1, `a push reaches the page (connections: ${first.connections})`);
  await page.waitForSelector('#log li:has-text("first message")', { timeout: 10000 });
  check(true, "the pushed message appears on the page");

  // The page's own form pushes too.
  await page.fill("#data", "from the form");
  await page.click("#push button");
  await page.waitForSelector('#log li:has-text("from the form")', { timeout: 10000 });
  check(true, "the page's form pushes a message that comes back to it");

  // CORS: the page's origin is the proxy's port, so a fetch to the server's own port is a
  // cross-origin push, with a preflight (it sends a JSON content type). With open publishing any
  // origin may push and read the answer, as on LNbits.
  const cross = await page.evaluate(async (url) => {
    const res = await fetch(url, { method: "POST", body: "across origins", headers: { "Content-Type": "application/json" } });
    return res.json();
  }, `http://127.0.0.1:${port}/api/v1/ws/browser-test`);
  check(cross.sent === true, `a page on another origin pushes and reads the answer (${JSON.stringify(cross)})`);
  await page.waitForSelector('#log li:has-text("across origins")', { timeout: 10000 });

  // The page's network goes away while pushes go on: it resumes and misses nothing.
  proxy.cut();
  await page.waitForSelector('#state[data-state="reconnecting"]', { timeout: 10000 });
  check(true, "the page notices that its connection dropped");
  for (const text of ["missed 1", "missed 2", "missed 3"]) await push(port, "browser-test", text);
  proxy.restore();
  await page.waitForSelector('#state[data-state="connected"]', { timeout: 20000 });
  await page.waitForSelector('#log li:has-text("missed 3")', { timeout: 10000 });
  const seen = await messages(page);
  check(JSON.stringify(seen) ===
          JSON.stringify(["first message", "from the form", "across origins", "missed 1", "missed 2", "missed 3"]),
        `after the drop the page has every message once, in order: ${JSON.stringify(seen)}`);
  check((await page.$$('#log li[data-kind="notice"]')).length === 0, "and it says nothing was lost");

  // Server goes away: the page notices and retries; a new server on the same port takes it back.
  check((await stopServer(server.child)) === 0, "the server exits 0 on SIGTERM");
  await page.waitForSelector('#state[data-state="reconnecting"]', { timeout: 10000 });
  check(true, "the page shows that it lost the server and is reconnecting");
  server = await startServer(port);
  await page.waitForSelector('#state[data-state="connected"]', { timeout: 20000 });
  check(true, "the page reconnects by itself to the restarted server");
  await page.waitForSelector('#log li[data-kind="notice"]:has-text("not recovered")', { timeout: 10000 });
  check(true, "it says it could not recover what the restarted server no longer has");
  const second = await push(port, "browser-test", "after the restart");
  check(second.connections === 1, `a push after the restart reaches the page (connections: ${second.connections})`);
  await page.waitForSelector('#log li:has-text("after the restart")', { timeout: 10000 });
  check(true, "the message pushed after the restart appears");

  await page.screenshot({ path: screenshotPath, fullPage: true });
  console.log(`screenshot: ${screenshotPath}`);
} catch (e) {
  check(false, `browser test: ${e.message.split("\n")[0]}`);
} finally {
  await browser.close();
  proxy.close();
  await stopServer(server.child);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
