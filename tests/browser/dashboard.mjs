// End-to-end test of the dashboard in headless Chromium against the real hub binary:
// register a file:// repo, sync it and watch the bar reach 100%, open a file, search,
// then restart the hub and see the page resume the stream without losing an event.
// Screenshots go to OUT_DIR; any console error outside the deliberate outage fails it.

import { spawn, execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const { HUB_BINARY, DATA_DIR, SECRET, TOKEN, REPO_URL, REPO_DIR, OUT_DIR, STATIC_DIR } = process.env;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
mkdirSync(OUT_DIR, { recursive: true });

function startHub(listen) {
  const child = spawn(HUB_BINARY, ["serve"], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: "warn",
      HIVESYNC_LISTEN: listen,
      HIVESYNC_DATA_DIR: DATA_DIR,
      HIVESYNC_JWT_SECRET: SECRET,
      HIVESYNC_ALLOWED_SCHEMES: "file",
      HIVESYNC_MIN_FREE_BYTES: "0",
      HIVESYNC_STATIC_DIR: STATIC_DIR,
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error("hub did not start")), 30_000);
    lines.on("line", (line) => {
      const match = line.match(/^hivesync serving on http:\/\/(.+)$/);
      if (match) {
        clearTimeout(timer);
        resolve({ child, addr: match[1] });
      }
    });
    child.on("exit", (code) => reject(new Error(`hub exited early (${code})`)));
  });
}

function stopHub(child) {
  return new Promise((resolve) => {
    child.once("exit", resolve);
    child.kill("SIGTERM");
  });
}

let step = 0;
async function shot(page, name) {
  step += 1;
  await page.screenshot({ path: `${OUT_DIR}/${String(step).padStart(2, "0")}-${name}.png`, fullPage: true });
}

const consoleErrors = [];
let outage = false;
let hub = await startHub("127.0.0.1:0");
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  page.on("console", (message) => {
    // while the hub is deliberately down, the browser itself logs refused connections
    if (message.type() === "error" && !outage) consoleErrors.push(`${message.text()} (${message.location().url})`);
  });
  page.on("pageerror", (error) => consoleErrors.push(`page error: ${error}`));

  await page.goto(`http://${hub.addr}/#token=${TOKEN}`);
  await page.locator('#connection[data-state="live"]').waitFor();
  await shot(page, "signed-in");

  await page.getByLabel("Name").fill("demo");
  await page.getByLabel("Repository URL").fill(REPO_URL);
  await page.getByRole("button", { name: "Register" }).click();
  await page.locator("#project-title", { hasText: "demo" }).waitFor();
  await shot(page, "registered");

  await page.locator("#sync-button").click();
  await page.waitForFunction(
    () => document.getElementById("progress").getAttribute("aria-valuenow") === "100"
      && document.getElementById("stage-text").textContent === "completed",
  );
  await page.locator('#notifications li[data-kind="repo_sync_success"]').waitFor();
  await shot(page, "synced");

  await page.locator('#tree button[data-path="README.md"]').click();
  await page.locator("#file-view", { hasText: "hello from the browser test" }).waitFor();
  await shot(page, "file");

  await page.getByLabel("Search text").fill("needle");
  await page.getByRole("button", { name: "Search" }).click();
  const hit = page.locator("#search-results button", { hasText: "src/lib.rs:2" });
  await hit.waitFor();
  await hit.click();
  await page.locator("#file-view .hl", { hasText: "needle" }).waitFor();
  await shot(page, "search");

  // the hub goes away: the page shows it and keeps trying
  outage = true;
  await stopHub(hub.child);
  await page.locator('#connection:is([data-state="reconnecting"], [data-state="polling"])').waitFor();
  await shot(page, "reconnecting");

  // back on the same address; a sync runs before the page is back, and the page must
  // still get its events by resuming from its last event id
  hub = await startHub(hub.addr);
  execFileSync("git", ["-C", REPO_DIR, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "--allow-empty", "-m", "while away"]);
  const projects = await (await fetch(`http://${hub.addr}/api/v1/projects`, { headers: { Authorization: `Bearer ${TOKEN}` } })).json();
  const requested = await fetch(`http://${hub.addr}/api/v1/repo/sync`, {
    method: "POST",
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ project_id: projects[0].project_id }),
  });
  if (requested.status !== 202) throw new Error(`sync request: ${requested.status}`);
  await page.locator('#connection[data-state="live"]').waitFor({ timeout: 30_000 });
  outage = false;
  await page.waitForFunction(() => document.querySelectorAll('#notifications li[data-kind="repo_sync_success"]').length === 2, null, { timeout: 30_000 });
  await page.waitForFunction(() => document.getElementById("progress").getAttribute("aria-valuenow") === "100");
  await page.waitForTimeout(400); // let the bar's width transition settle for the screenshot
  await shot(page, "resumed");

  if (consoleErrors.length) throw new Error(`console errors:\n${consoleErrors.join("\n")}`);
  console.log(`dashboard test passed; screenshots in ${OUT_DIR}`);
} finally {
  await browser.close();
  await stopHub(hub.child);
}
