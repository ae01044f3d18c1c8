// Drives the Integrations page in Debian's headless Chromium through
// connect -> pick organisation -> map -> issue a document -> see it
// delivered -> disconnect, against the Xero simulator; then connects the
// JSON webhook (no OAuth) from its own card; saving screenshots.
// Run by host/tests/browser.rs, which starts the daemon and the simulator
// and passes BASE, LOGIN_URL, SERVICE_KEY, DOCUMENT, SHOTS, MAPPINGS,
// ORG_NAME and WEBHOOK_SECRET.
import { chromium } from 'playwright-core';
import { readFileSync, mkdirSync } from 'node:fs';

const { BASE, LOGIN_URL, SERVICE_KEY, DOCUMENT, SHOTS, MAPPINGS, ORG_NAME, WEBHOOK_SECRET } = process.env;
mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
const fail = async (why) => { await shot('failure'); console.error(why); await browser.close(); process.exit(1); };

try {
  await page.goto(LOGIN_URL);
  await page.waitForSelector('#xero');
  if ((await page.textContent('#status')).trim() !== 'Not connected') await fail('expected Not connected');
  await shot('1-integrations');

  // Connect: the provider's consent page with an organisation picker.
  await page.click('#connect');
  await page.waitForSelector('#approve');
  for (const box of await page.$$('input[name=tenant]')) {
    const label = await box.evaluate((el) => el.parentElement.textContent.trim());
    if (label === ORG_NAME) await box.check(); else await box.uncheck();
  }
  await shot('2-consent');
  await page.click('#approve');
  await page.waitForSelector('#connected, #connect', { timeout: 15000 });
  if (page.url().includes('/oauth/pick')) {
    await page.check(`input[name=organisation]`);
    await page.click('#connect');
  }
  await page.waitForSelector('#connected');
  await shot('3-connected');
  await page.click('#back');
  await page.waitForSelector('#status');
  if ((await page.textContent('#status')).trim() !== 'Connected') await fail('expected Connected after connecting');

  // Configure: the choices are the organisation's accounts.
  await page.click('#menu summary');
  await page.click('#configure');
  await page.waitForSelector('#mapping');
  for (const [kind, code] of Object.entries(JSON.parse(MAPPINGS))) {
    await page.selectOption(`select[name="${kind}"]`, code);
  }
  await shot('4-configure');
  await page.click('#save');
  await page.waitForSelector('#xero');

  // The platform issues a document; it shows up as delivered.
  const body = readFileSync(DOCUMENT, 'utf8');
  const r = await fetch(`${BASE}/v1/documents`, {
    method: 'POST', body,
    headers: { authorization: `Bearer ${SERVICE_KEY}`, 'content-type': 'application/json' },
  });
  if (r.status !== 202) await fail(`issue answered ${r.status}: ${await r.text()}`);
  const number = JSON.parse(body).number;
  let delivered = false;
  for (let i = 0; i < 150 && !delivered; i++) {
    await page.reload();
    delivered = (await page.locator(`tr[data-number="${number}"] td.delivered`).count()) > 0;
    if (!delivered) await page.waitForTimeout(200);
  }
  if (!delivered) await fail(`${number} was not delivered`);
  await shot('5-delivered');

  // The log's filters: Failed shows nothing here, Delivered shows it; a
  // search by its number finds it.
  await page.click('#log-failed');
  await page.waitForSelector('#log-empty');
  if ((await page.textContent('#log-heading')).trim() !== 'Delivery log: failed') await fail('expected the failed view');
  if ((await page.locator(`tr[data-number="${number}"]`).count()) !== 0) await fail(`${number} listed as failed`);
  await page.click('#log-delivered');
  await page.waitForSelector(`tr[data-number="${number}"] td.delivered`);
  if ((await page.getAttribute('#log-delivered', 'aria-current')) !== 'page') await fail('the Delivered link is not marked current');
  await page.fill('#log-find input[name=number]', number);
  await page.click('#log-find button');
  await page.waitForSelector(`tr[data-number="${number}"]`);
  if (!(await page.textContent('#log-heading')).includes(number)) await fail('the heading does not name the search');
  await page.goto(`${BASE}/integrations`);

  // Disconnect from the 3-dot menu.
  await page.click('#menu summary');
  await page.click('#disconnect');
  await page.waitForSelector('#status');
  if ((await page.textContent('#status')).trim() !== 'Disconnected') await fail('expected Disconnected');
  await shot('6-disconnected');

  // A connector without OAuth on its own card: Connect checks its settings
  // (refused, naming the missing secret), then connects at once.
  await page.click('#webhook_connect');
  await page.waitForSelector('#message');
  const refusal = await page.textContent('#message');
  if (!refusal.includes('signing_secret')) await fail(`expected the missing secret named: ${refusal}`);
  await page.goto(`${BASE}/integrations`);
  await page.fill('#webhook_settings input[name=signing_secret]', WEBHOOK_SECRET);
  await page.click('#webhook_save-settings');
  await page.waitForSelector('#webhook_card');
  await page.click('#webhook_connect');
  await page.waitForSelector('#connected');
  await shot('7-webhook-connected');
  await page.click('#back');
  await page.waitForSelector('#webhook_status');
  if ((await page.textContent('#webhook_status')).trim() !== 'Connected') await fail('expected the webhook Connected');
  if ((await page.textContent('#status')).trim() !== 'Disconnected') await fail('Xero\'s card is its own');

  // Sign out ends the session on the daemon, not only in this browser: the
  // session cookie, put back afterwards, no longer signs in.
  if (!(await page.textContent('#who')).includes('alice@acme.example')) await fail('the page does not say who is signed in');
  const session = await page.context().cookies();
  await page.click('#logout');
  await page.waitForSelector('#message');
  if (!(await page.textContent('h1')).includes('Sign in through the platform')) await fail('still signed in after Sign out');
  await page.context().addCookies(session);
  const after = await page.goto(`${BASE}/integrations`);
  if (after.status() !== 401) await fail(`the signed-out session answered ${after.status()}`);
  if (!(await page.textContent('h1')).includes('Signed out')) await fail('expected the session to be over');
  console.log('browser flow ok');
} catch (e) {
  await fail(`browser flow failed: ${e.stack || e}`);
}
await browser.close();
