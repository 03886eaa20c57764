// The dashboard's shell: hash routes (#functions, #nodes, #runs, #run/ID, #cost), the
// token form, and the refresh loop (one sample every 2 s, then the page redraws).

import { session, takeSample } from "/ui/data.js";
import { costPage, functionsPage, nodesPage, runPage, runsPage } from "/ui/pages.js";

const REFRESH_MS = 2000;
const PAGES = { functions: functionsPage, nodes: nodesPage, runs: runsPage, run: runPage, cost: costPage };
const main = document.getElementById("main");
const banner = document.getElementById("banner");
let current = null;

function route() {
  const [path] = location.hash.replace(/^#/, "").split("?");
  const [name, arg] = path.split("/");
  const page = PAGES[name] ? name : "functions";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === (page === "run" ? "runs" : page));
  }
  current = PAGES[page];
  current.mount(main, arg && decodeURIComponent(arg));
  document.body.dataset.page = page;
  refreshPage();
}

function showError(e) {
  banner.textContent = e ? e.message : "";
  banner.classList.toggle("hidden", !e);
}

function showAccess() {
  const el = document.getElementById("access");
  if (!session.needsToken) el.textContent = "admin (no token configured)";
  else if (session.token) el.textContent = "admin";
  else el.textContent = session.refused ? "token refused: read-only" : "read-only";
}

async function refreshPage() {
  const page = current;
  try {
    await page.update();
    showError(null);
  } catch (e) {
    showError(e);
  }
  showAccess();
}

async function tick() {
  try {
    await takeSample();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
    await refreshPage();
  } catch (e) {
    showError(e);
  } finally {
    setTimeout(tick, REFRESH_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  session.setToken(input.value.trim());
  input.value = "";
  refreshPage();
});
document.getElementById("forget").addEventListener("click", () => {
  session.setToken("");
  refreshPage();
});
window.addEventListener("hashchange", route);
route();
tick();
