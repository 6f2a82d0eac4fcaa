// Opens the chat page of `so8t serve` on a vision model in headless Chromium, attaches an
// image to a message and checks that the image shows in the user's bubble and the answer
// streams in as coloured token spans with its verdict line.
//
//   NODE_PATH=... node chat_page_image.mjs URL CHROMIUM IMAGE SCREENSHOT.png
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [url, executablePath, image, shot] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => !document.getElementById("model").textContent.startsWith("…"));
  if (!(await page.isVisible("#image"))) throw new Error("the page offers no image input for a vision model");
  await page.setInputFiles("#image", image);
  await page.fill("#input", "What is in this picture?");
  await page.click("#send");
  await page.waitForSelector(".verdict, .error", { timeout: 60000 });
  const result = await page.evaluate(() => {
    const img = document.querySelector(".msg.user img");
    const spans = [...document.querySelectorAll(".msg.assistant .tok")];
    return {
      image: img ? { loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth, height: img.naturalHeight } : null,
      spans: spans.length,
      coloured: spans.filter((s) => s.dataset.pUnsafe !== undefined).length,
      errors: [...document.querySelectorAll(".error")].map((e) => e.textContent),
      cleared: document.getElementById("image").value === "",
    };
  });
  await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ result, errors }));
  if (errors.length || result.errors.length) throw new Error("errors: " + JSON.stringify({ errors, result }));
  if (!result.image || !result.image.loaded) throw new Error("the attached image is not shown: " + JSON.stringify(result));
  if (result.spans < 1 || result.coloured !== result.spans) throw new Error("no coloured answer: " + JSON.stringify(result));
  if (!result.cleared) throw new Error("the image stays attached after sending");
} finally {
  await browser.close();
}
