// Sign-in, navigation and the view lifecycle.
import { auth, setAuth, signIn } from "./api.js";
import * as views from "./views.js";

const $ = (id) => document.getElementById(id);
let stop = () => {};

function show(name) {
  stop();
  const a = auth();
  const root = $("view");
  root.replaceChildren();
  views.status(null);
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === name);
  stop = views[name](root, { admin: a.kind === "admin" }) || (() => {});
  sessionStorage.setItem("proxyorch.view", name);
}

function enter() {
  const a = auth();
  const signedIn = !!a;
  $("signin").hidden = signedIn;
  $("view").hidden = !signedIn;
  $("nav").hidden = !signedIn;
  $("signout").hidden = !signedIn;
  $("who").textContent = signedIn ? (a.kind === "admin" ? "admin" : "user token") : "";
  if (signedIn) show(sessionStorage.getItem("proxyorch.view") || (a.kind === "admin" ? "sessions" : "devices"));
  else { stop(); stop = () => {}; }
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const token = $("signin-token").value.trim();
  $("signin-error").textContent = "";
  if (!token) return;
  try {
    setAuth(await signIn(token, $("signin-admin").checked));
    $("signin-token").value = "";
    enter();
  } catch (err) {
    $("signin-error").textContent = err.status === 401 ? "That token is not valid." : `Sign-in failed: ${err.message}`;
  }
});
for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
$("signout").addEventListener("click", () => { setAuth(null); sessionStorage.removeItem("proxyorch.view"); enter(); });
enter();
