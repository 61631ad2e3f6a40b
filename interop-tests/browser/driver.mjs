// Drives one headless Chromium for interop-tests/tests/browser.rs.
//
// Reads one JSON command per line on stdin, answers one JSON line per command on stdout:
//   {"id":1,"op":"open","page":"a","url":"http://…/","width":1100,"height":800}
//   {"id":2,"op":"eval","page":"a","js":"<body of an async function of arg>","arg":…} -> result
//   {"id":3,"op":"fill","page":"a","selector":"#name","value":"alice"}
//   {"id":4,"op":"click","page":"a","selector":"#join"}
//   {"id":5,"op":"press","page":"a","selector":"#message","key":"Enter"}
//   {"id":6,"op":"viewport","page":"a","width":390,"height":800}
//   {"id":7,"op":"screenshot","page":"a","path":"/…/demo.png","fullPage":true}
//   {"id":8,"op":"quit"}
// Answers: {"id":n,"ok":true,"value":…} or {"id":n,"ok":false,"error":"…"}.
// Console messages and page errors of every page go to stderr, prefixed with the page name.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

// Flags from /work/shared/DESIGN.md §7: no sandbox (root), no GPU, nothing phoning home, and
// real host candidates instead of mDNS names.
const browser = await chromium.launch({
  executablePath: process.env.PEERMESH_CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
    '--disable-features=WebRtcHideLocalIpsWithMdns',
  ],
});
const context = await browser.newContext();
const pages = new Map();

function page(name) {
  const p = pages.get(name);
  if (!p) throw new Error(`no page ${name}`);
  return p;
}

async function run(cmd) {
  switch (cmd.op) {
    case 'open': {
      const p = await context.newPage();
      p.on('console', (m) => process.stderr.write(`[${cmd.page} ${m.type()}] ${m.text()}\n`));
      p.on('pageerror', (e) => process.stderr.write(`[${cmd.page} pageerror] ${e.stack ?? e}\n`));
      await p.setViewportSize({ width: cmd.width ?? 1100, height: cmd.height ?? 800 });
      await p.goto(cmd.url);
      pages.set(cmd.page, p);
      return null;
    }
    case 'eval':
      // `js` is the body of an async function of `arg` (any JSON value).
      return await page(cmd.page).evaluate(
        ([body, arg]) => new Function('arg', `return (async () => {\n${body}\n})();`)(arg),
        [cmd.js, cmd.arg ?? null],
      );
    case 'fill':
      return await page(cmd.page).fill(cmd.selector, cmd.value);
    case 'click':
      return await page(cmd.page).click(cmd.selector);
    case 'press':
      return await page(cmd.page).press(cmd.selector, cmd.key);
    case 'viewport':
      return await page(cmd.page).setViewportSize({ width: cmd.width, height: cmd.height });
    case 'screenshot':
      await page(cmd.page).screenshot({ path: cmd.path, fullPage: cmd.fullPage ?? false });
      return cmd.path;
    case 'quit':
      await browser.close();
      return null;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const reply = (msg) => process.stdout.write(JSON.stringify(msg) + '\n');
reply({ id: 0, ok: true, value: browser.version() });

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    reply({ id: null, ok: false, error: `bad command: ${e.message}` });
    continue;
  }
  try {
    const value = await run(cmd);
    reply({ id: cmd.id, ok: true, value: value ?? null });
  } catch (e) {
    reply({ id: cmd.id, ok: false, error: String(e?.stack ?? e) });
  }
  if (cmd.op === 'quit') break;
}
// stdin closed (the test ended): take the browser down with us.
await browser.close().catch(() => {});
process.exit(0);
