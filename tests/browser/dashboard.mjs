// End-to-end test of the dashboard in headless Chromium against the real hub binary:
// register a file:// repo, sync it and watch the bar reach 100%, open a file, search,
// then restart the hub and see the page resume the stream without losing an event.
// Then keeping mirrors fresh: turn a webhook on in the page, push upstream and deliver a
// signed push (the bar moves, the notification says what changed and that a webhook
// started it), rewrite history, turn the webhook off; and a scheduled project whose
// remote is missing pauses, shows it, and syncs again after Resume once the remote exists.
// Screenshots go to OUT_DIR; any console error outside the deliberate outage fails it.

import { spawn, execFileSync } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

// LATER_REPO_DIR does not exist yet: the second project's remote, made before Resume
const { HUB_BINARY, DATA_DIR, SECRET, TOKEN, REPO_URL, REPO_DIR, LATER_REPO_DIR, OUT_DIR, STATIC_DIR } = process.env;
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
      // the test's repositories are under the system temp dir
      HIVESYNC_FILE_ROOTS: tmpdir(),
      HIVESYNC_MIN_FREE_BYTES: "0",
      HIVESYNC_STATIC_DIR: STATIC_DIR,
      // a one-second schedule is allowed, and one failed scheduled sync pauses it
      HIVESYNC_MIN_SYNC_INTERVAL_S: "1",
      HIVESYNC_PAUSE_AFTER_FAILURES: "1",
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

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function git(...args) {
  return execFileSync("git", ["-C", REPO_DIR, "-c", "user.name=t", "-c", "user.email=t@example.com", ...args], { encoding: "utf8" }).trim();
}

/** A delivery as GitHub signs it. */
function deliver(url, secret, body, { event = "push", signature } = {}) {
  const raw = JSON.stringify(body);
  return fetch(url, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      "X-GitHub-Event": event,
      "X-GitHub-Delivery": randomUUID(),
      "X-Hub-Signature-256": signature ?? `sha256=${createHmac("sha256", secret).update(raw).digest("hex")}`,
    },
    body: raw,
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

  // a bad token first: the page says so; a good one then clears it (the browser logs
  // the refused requests of these deliberate mistakes as console errors)
  outage = true;
  await page.goto(`http://${hub.addr}/#token=not-a-token`);
  await page.locator("#banner", { hasText: "Could not sign in" }).waitFor();
  await page.getByLabel("Access token").fill(TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator('#connection[data-state="live"]').waitFor();
  await page.locator("#banner").waitFor({ state: "hidden" });
  await shot(page, "signed-in");

  // a refusal someone can fix shows beside the form, naming the setting
  await page.getByLabel("Name").fill("nope");
  await page.getByLabel("Repository URL").fill("ftp://example.com/x.git");
  await page.getByRole("button", { name: "Register" }).click();
  await page.locator("#register-error", { hasText: "HIVESYNC_ALLOWED_SCHEMES" }).waitFor();
  check(await page.locator("#banner").isHidden(), "the refusal is not in the banner");
  await page.getByLabel("Name").fill("");
  outage = false;

  await page.getByLabel("Name").fill("demo");
  await page.getByLabel("Repository URL").fill(REPO_URL);
  await page.getByRole("button", { name: "Register" }).click();
  await page.locator("#project-title", { hasText: "demo" }).waitFor();
  await page.locator("#register-error").waitFor({ state: "hidden" });
  check(await page.locator("#file-view").isHidden(), "no empty file box before a file is chosen");
  await page.locator("#file-hint").waitFor();
  await shot(page, "registered");

  await page.locator("#sync-button").click();
  await page.waitForFunction(
    () => document.getElementById("progress").getAttribute("aria-valuenow") === "100"
      && document.getElementById("stage-text").textContent === "completed",
  );
  await page.locator('#notifications li[data-kind="repo_sync_success"]').waitFor();
  const detail = await page.locator("#progress-detail").textContent();
  check(/objects · \d+(\.\d+)? (B|KiB|MiB|GiB)$/.test(detail), `bytes as people read them: ${detail}`);
  const badges = await page.locator(".status").allTextContents();
  check(badges.every((text) => !text.includes("_")), `stage names as people read them: ${badges}`);
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
  // the line after the hit is drawn below it, whole; the tree shows the file's folder
  const [hl, next] = [await page.locator("#file-view .hl").boundingBox(), await page.locator('#file-view [data-line="3"]').boundingBox()];
  check(next && next.y >= hl.y + hl.height - 1 && next.x <= hl.x + 1, `the next line is below the hit: ${JSON.stringify([hl, next])}`);
  await page.locator("#tree-path", { hasText: "/src" }).waitFor();
  await shot(page, "search");
  // the README's picture: this view, the viewport only (a stable size)
  await page.screenshot({ path: `${OUT_DIR}/dashboard.png` });

  // a 500-character line scrolls inside the file box; the page never widens
  await page.locator("#tree").getByRole("button", { name: "..", exact: true }).click();
  await page.locator('#tree button[data-path="long.txt"]').click();
  await page.locator("#file-view", { hasText: "x".repeat(100) }).waitFor();
  for (const width of [1366, 1920]) {
    await page.setViewportSize({ width, height: 900 });
    const widths = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
    check(widths[0] <= widths[1], `at ${width} px a long line widened the page: ${widths}`);
    await shot(page, `long-line-${width}`);
  }
  await page.setViewportSize({ width: 1440, height: 900 });

  // the hub goes away: the page shows it and keeps trying
  outage = true;
  await stopHub(hub.child);
  await page.locator('#connection:is([data-state="reconnecting"], [data-state="polling"], [data-state="offline"])').waitFor();
  await shot(page, "reconnecting");
  // with the hub gone, polling fails too: the page says it is offline, not "polling"
  await page.locator('#connection[data-state="offline"]', { hasText: "offline — retrying" }).waitFor({ timeout: 30_000 });

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

  // ---- webhook: the page turns it on and shows the URL and the secret once -----------
  const demoId = projects.find((project) => project.name === "demo").project_id;
  await page.locator(`#projects li[data-project="${demoId}"] button.link`).click();
  await page.locator("#project-title", { hasText: "demo" }).waitFor();
  await page.locator('#webhook-status[data-on="false"]').waitFor();
  await page.locator("#webhook-create", { hasText: "Turn on webhook" }).click();
  await page.locator("#webhook-reveal").waitFor({ state: "visible" });
  const hookUrl = (await page.locator("#webhook-url").textContent()).trim();
  const hookSecret = (await page.locator("#webhook-secret").textContent()).trim();
  check(hookUrl === `http://${hub.addr}/api/v1/webhooks/${demoId}`, `webhook URL shown: ${hookUrl}`);
  check(hookSecret.length >= 16, "a webhook secret is shown");
  check((await page.locator("#webhook-reveal").textContent()).includes("never returned again"), "the page says the secret is shown once");
  await page.locator('#webhook-status[data-on="true"]').waitFor();
  await page.locator(`#projects li[data-project="${demoId}"] .status[data-status="webhook"]`).waitFor();
  await shot(page, "webhook-on");

  // a wrong signature is refused; nothing starts
  const forged = await deliver(hookUrl, hookSecret, { ref: "refs/heads/main" }, { signature: `sha256=${"0".repeat(64)}` });
  check(forged.status === 401, `forged delivery: ${forged.status}`);

  // two commits touching three files land upstream, and the forge says so
  writeFileSync(join(REPO_DIR, "README.md"), "hello from the browser test\nnow with a webhook\n");
  mkdirSync(join(REPO_DIR, "docs"), { recursive: true });
  writeFileSync(join(REPO_DIR, "docs/guide.md"), "# Guide\n");
  git("add", "-A");
  git("commit", "-q", "-m", "docs");
  writeFileSync(join(REPO_DIR, "src/lib.rs"), "pub fn f() {}\nlet needle = 43;\n");
  git("commit", "-q", "-am", "bump");
  // watch the bar from here on: it must leave 100% and come back
  await page.evaluate(() => {
    window.__bar = [];
    const bar = document.getElementById("progress");
    new MutationObserver(() => window.__bar.push([Number(bar.getAttribute("aria-valuenow")), document.getElementById("stage-text").textContent]))
      .observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
  });
  const pushed = await deliver(hookUrl, hookSecret, { ref: "refs/heads/main", after: git("rev-parse", "HEAD") });
  check(pushed.status === 202, `signed delivery: ${pushed.status}`);
  const hookSync = (await pushed.json()).sync_id;
  const hookNote = page.locator(`#notifications li[data-kind="repo_sync_success"][data-sync="${hookSync}"]`);
  await hookNote.waitFor({ timeout: 30_000 });
  await hookNote.locator('.trigger[data-trigger="webhook"]').waitFor();
  const hookText = await hookNote.textContent();
  check(hookText.includes("2 commits, 3 files"), `what changed: ${hookText}`);
  check(hookText.includes("webhook push"), `trigger shown: ${hookText}`);
  check(!hookText.includes("history rewritten"), `not forced: ${hookText}`);
  await page.waitForFunction(
    () => document.getElementById("progress").getAttribute("aria-valuenow") === "100"
      && document.getElementById("stage-text").textContent === "completed",
  );
  const bar = await page.evaluate(() => window.__bar);
  check(bar.some(([percent, stage]) => percent < 100 && stage !== "completed"), `the bar never moved: ${JSON.stringify(bar)}`);
  await page.locator("#history td", { hasText: "webhook push" }).first().waitFor();
  await page.waitForTimeout(400); // the bar's width transition, for the screenshot
  await shot(page, "webhook-synced");

  // history rewritten upstream: the notification says so
  git("commit", "-q", "--amend", "-m", "bump, reworded");
  const rewritten = await deliver(hookUrl, hookSecret, { ref: "refs/heads/main" });
  check(rewritten.status === 202, `signed delivery after a rewrite: ${rewritten.status}`);
  const forcedNote = page.locator(`#notifications li[data-kind="repo_sync_success"][data-sync="${(await rewritten.json()).sync_id}"]`);
  await forcedNote.locator(".forced", { hasText: "history rewritten" }).waitFor({ timeout: 30_000 });
  await forcedNote.locator('.trigger[data-trigger="webhook"]').waitFor();

  // a push to another branch is ignored
  const otherRef = await deliver(hookUrl, hookSecret, { ref: "refs/heads/feature" });
  check(otherRef.status === 200 && "ignored" in (await otherRef.json()), `other branch: ${otherRef.status}`);

  // turned off in the page: the same signed delivery now finds nothing
  page.once("dialog", (dialog) => dialog.accept());
  await page.locator("#webhook-delete").click();
  await page.locator('#webhook-status[data-on="false"]').waitFor();
  await page.locator("#webhook-reveal").waitFor({ state: "hidden" });
  const afterOff = await deliver(hookUrl, hookSecret, { ref: "refs/heads/main" });
  check(afterOff.status === 404, `delivery after turning webhooks off: ${afterOff.status}`);
  await shot(page, "webhook-off");

  // ---- a schedule that fails pauses; Resume starts it again ---------------------------
  await page.getByLabel("Search text").fill("left over");
  await page.getByLabel("Name").fill("later");
  await page.getByLabel("Repository URL").fill(`file://${LATER_REPO_DIR}`);
  await page.getByRole("button", { name: "Register" }).click();
  await page.locator("#project-title", { hasText: "later" }).waitFor();
  const laterId = await page.locator('#projects li[aria-current="true"]').getAttribute("data-project");
  check(laterId && laterId !== demoId, "the new project is selected");
  check((await page.getByLabel("Search text").inputValue()) === "", "another project starts with no search text");
  check((await page.locator("#tree-path").textContent()) !== "/src", "nor the other project's folder");
  await page.locator("#schedule-text", { hasText: "On demand only" }).waitFor();
  await page.locator("#interval-value").fill("1");
  await page.locator("#interval-unit").selectOption("1");
  const [patched] = await Promise.all([
    page.waitForResponse((response) => response.url().endsWith(`/api/v1/projects/${laterId}`) && response.request().method() === "PATCH"),
    page.locator("#interval-save").click(),
  ]);
  check(patched.status() === 200 && (await patched.json()).sync_interval_s === 1, `PATCH interval: ${patched.status()}`);
  await page.locator('#schedule-text[data-interval="1"]').waitFor();

  // its remote does not exist: the first scheduled sync fails and pauses the schedule
  await page.locator('#paused-block[data-paused="true"]').waitFor({ state: "visible", timeout: 30_000 });
  await page.locator(`#projects li[data-project="${laterId}"] .status[data-status="paused"]`).waitFor();
  await page.locator(`#notifications li[data-kind="repo_sync_paused"][data-project="${laterId}"]`).waitFor();
  await page.locator(`#notifications li[data-kind="repo_sync_failed"][data-project="${laterId}"] .trigger[data-trigger="schedule"]`).waitFor();
  check((await page.locator("#paused-text").textContent()).includes("repo_not_found"), "the pause says why");
  check((await page.locator("#last-error").textContent()).startsWith("repo_not_found"), "the last error is shown");
  check((await page.locator("#last-success").textContent()) === "never", "never succeeded");
  check((await page.locator("#last-attempt").textContent()) !== "never", "an attempt is shown");
  await page.locator('#progress[data-status="failed"][aria-valuenow="100"]').waitFor();
  await shot(page, "paused");

  // opened afresh after all that, the page shows what happened: the notifications from
  // the history (each once, the stream going on from there), and on the failed, paused
  // project's card its error and why it is paused, with Resume beside it
  await page.reload();
  await page.locator('#connection[data-state="live"]').waitFor();
  const card = page.locator(`#projects li[data-project="${laterId}"]`);
  await card.locator('.card-error[data-error-code="repo_not_found"]').waitFor();
  await card.locator('.card-error[data-paused="true"]', { hasText: "repo_not_found" }).waitFor();
  await card.getByRole("button", { name: "Resume later" }).waitFor();
  await page.locator(`#notifications li[data-kind="repo_sync_paused"][data-project="${laterId}"]`).waitFor();
  await page.locator(`#notifications li[data-kind="repo_sync_success"][data-sync="${hookSync}"]`).waitFor();
  await page.waitForTimeout(1_000); // anything the stream would repeat arrives by now
  const pausedNotes = await page.locator(`#notifications li[data-kind="repo_sync_paused"][data-project="${laterId}"]`).count();
  check(pausedNotes === 1, `the pause is shown once, not ${pausedNotes} times`);
  await page.locator(`#projects li[data-project="${laterId}"] button.link`).click();
  await page.locator("#project-title", { hasText: "later" }).waitFor();
  await page.locator('#paused-block[data-paused="true"]').waitFor({ state: "visible" });
  await shot(page, "reopened");

  // the remote appears; Resume clears the pause and the schedule syncs it
  execFileSync("git", ["clone", "-q", "--bare", REPO_DIR, LATER_REPO_DIR]);
  const [resumed] = await Promise.all([
    page.waitForResponse((response) => response.url().endsWith(`/api/v1/projects/${laterId}/resume`)),
    page.locator("#resume-button").click(),
  ]);
  const resumedBody = await resumed.json();
  check(resumed.status() === 200 && resumedBody.schedule.paused === false, `resume: ${resumed.status()} ${JSON.stringify(resumedBody.schedule)}`);
  await page.locator("#paused-block").waitFor({ state: "hidden" });
  await page.locator(`#notifications li[data-kind="repo_sync_success"][data-project="${laterId}"] .trigger[data-trigger="schedule"]`).waitFor({ timeout: 30_000 });
  await page.locator("#last-error", { hasText: "none" }).waitFor();
  await page.waitForFunction(() => document.getElementById("last-success").textContent !== "never");
  check(await page.locator(`#projects li[data-project="${laterId}"] .status[data-status="paused"]`).count() === 0, "no longer paused in the list");
  await page.locator('#tree button[data-path="docs"]').waitFor();

  // back to on demand
  const [cleared] = await Promise.all([
    page.waitForResponse((response) => response.url().endsWith(`/api/v1/projects/${laterId}`) && response.request().method() === "PATCH"),
    page.locator("#interval-clear").click(),
  ]);
  check(cleared.status() === 200 && (await cleared.json()).sync_interval_s === null, `clearing the interval: ${cleared.status()}`);
  await page.locator("#schedule-text", { hasText: "On demand only" }).waitFor();
  await shot(page, "resumed-schedule");

  // a phone: one column, every part reachable, nothing wider than the screen
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  phone.on("pageerror", (error) => consoleErrors.push(`page error (390 px): ${error}`));
  await phone.goto(`http://${hub.addr}/#token=${TOKEN}`);
  await phone.locator('#connection[data-state="live"]').waitFor();
  await phone.locator(`#projects li[data-project="${demoId}"] button.link`).click();
  await phone.locator("#project-title", { hasText: "demo" }).waitFor();
  await phone.locator('#tree button[data-path="long.txt"]').click();
  await phone.locator("#file-view", { hasText: "x".repeat(100) }).waitFor();
  const phoneWidths = await phone.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  check(phoneWidths[0] <= phoneWidths[1], `at 390 px the page is wider than the screen: ${phoneWidths}`);
  const [listBox, viewBox] = [await phone.locator("#projects").boundingBox(), await phone.locator("#project-title").boundingBox()];
  check(viewBox.y > listBox.y && viewBox.x < 390, `the project comes below the list and on screen: ${JSON.stringify([listBox, viewBox])}`);
  await phone.screenshot({ path: `${OUT_DIR}/${String(++step).padStart(2, "0")}-phone.png`, fullPage: true });
  await phone.close();

  if (consoleErrors.length) throw new Error(`console errors:\n${consoleErrors.join("\n")}`);
  console.log(`dashboard test passed; screenshots in ${OUT_DIR}`);
} finally {
  await browser.close();
  await stopHub(hub.child);
}
