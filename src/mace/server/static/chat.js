// The chat page: one conversation over the websocket protocol of docs/websocket.md, its history kept
// here and sent whole with every turn, and corrections posted to /v1/feedback as training samples.
import { apiKey, bindApiKeyField, errorMessage, keyAdvice, requestJSON } from "./common.js";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), maxTokens: $("max-tokens"), temperature: $("temperature"), model: $("model"),
  adapter: $("adapter"), connection: $("connection"), apiKey: $("api-key"),
};

const history = []; // [{role, content}], what the model sees next turn
let socket = null;
let current = null; // the turn being generated: {id, userIndex, bubble, text}
let turnCount = 0;
let reconnectMs = 500;
let keyNeeded = false; // the last stats call was refused for the key

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // Browsers cannot set headers on a websocket upgrade, so the key rides in the query (see auth.py).
  const key = apiKey();
  const query = key ? `?api_key=${encodeURIComponent(key)}` : "";
  const opened = new WebSocket(`${scheme}://${location.host}/v1/ws${query}`);
  socket = opened;
  let wasOpen = false;
  setConnection("connecting");
  opened.addEventListener("open", () => {
    wasOpen = true;
    reconnectMs = 500;
    setConnection("open");
  });
  opened.addEventListener("message", (event) => onServerMessage(JSON.parse(event.data)));
  opened.addEventListener("close", () => {
    if (socket !== opened) return; // replaced on purpose (a new key)
    setConnection("closed");
    if (current) endTurn("error", "the connection to the server closed");
    if (!wasOpen) refreshFacts(); // a refused upgrade says nothing; the stats call tells if a key is missing
    setTimeout(connect, reconnectMs);
    reconnectMs = Math.min(reconnectMs * 2, 10000);
  });
}

function reconnectWithNewKey() {
  const old = socket;
  reconnectMs = 500;
  if (current) endTurn("error", "the connection was reopened with the new API key");
  connect();
  old?.close();
  refreshFacts();
}

function setConnection(state) {
  ui.connection.dataset.state = state;
  if (state === "open") ui.connection.textContent = "connected";
  else if (keyNeeded) ui.connection.textContent = "API key needed";
  else ui.connection.textContent = state === "closed" ? "disconnected" : "connecting";
  updateButtons();
}

function updateButtons() {
  const open = socket !== null && socket.readyState === WebSocket.OPEN;
  ui.send.disabled = !open || current !== null;
  ui.stop.disabled = current === null;
}

function onServerMessage(message) {
  if (message.type === "pong") return;
  if (!current || message.id !== current.id) return; // a stopped turn's late deltas
  if (message.type === "delta") {
    appendText(message.text);
  } else if (message.type === "done") {
    ui.adapter.textContent = `v${message.adapter_version}`;
    const tokens = message.usage?.completion_tokens ?? "?";
    endTurn("done", `adapter v${message.adapter_version} · ${tokens} tokens · ${message.finish_reason}`);
  } else if (message.type === "error") {
    endTurn("error", message.error?.message ?? "the generation failed");
  }
}

function appendText(text) {
  const follow = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
  current.text += text;
  current.textNode.appendData(text);
  if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function addBubble(role, text) {
  ui.messages.querySelector(".empty")?.remove();
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.append(document.createTextNode(text));
  const meta = document.createElement("div");
  meta.className = "meta";
  bubble.append(body, meta);
  ui.messages.append(bubble);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return bubble;
}

function setMeta(bubble, text, isError = false) {
  const meta = bubble.querySelector(".meta");
  meta.replaceChildren();
  const note = document.createElement("span");
  note.textContent = text;
  if (isError) note.className = "error";
  meta.append(note);
  return meta;
}

function startTurn(text) {
  const userIndex = history.push({ role: "user", content: text }) - 1;
  addBubble("user", text);
  const bubble = addBubble("assistant", "");
  bubble.dataset.state = "streaming";
  const textNode = bubble.querySelector(".text").firstChild;
  current = { id: `turn-${++turnCount}`, userIndex, bubble, text: "", textNode };
  const request = { type: "chat", id: current.id, messages: history.slice() };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  const temperature = parseFloat(ui.temperature.value);
  if (temperature >= 0) request.temperature = temperature;
  socket.send(JSON.stringify(request));
  updateButtons();
}

// state: "done" | "stopped" | "error". An answer (even a stopped one, or an empty one that can be
// corrected) joins the history; a failed turn or one stopped before any text leaves it, so the next
// turn does not carry a question without its answer.
function endTurn(state, note) {
  const turn = current;
  current = null;
  turn.bubble.dataset.state = state;
  if (state === "done" || (state === "stopped" && turn.text)) {
    const index = history.push({ role: "assistant", content: turn.text }) - 1;
    const meta = setMeta(turn.bubble, note);
    addCorrectButton(turn.bubble, meta, index);
  } else {
    history.splice(turn.userIndex);
    setMeta(turn.bubble, state === "error" ? note : "stopped before any text", state === "error");
  }
  updateButtons();
}

function stopTurn() {
  if (!current) return;
  socket.send(JSON.stringify({ type: "cancel", id: current.id }));
  endTurn("stopped", "stopped");
}

function addCorrectButton(bubble, meta, index) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = "Correct this answer";
  button.addEventListener("click", () => openCorrection(bubble, index, button));
  meta.append(button);
}

function openCorrection(bubble, index, button) {
  if (bubble.querySelector(".correction")) return;
  button.disabled = true;
  const form = document.createElement("form");
  form.className = "correction";
  const answer = document.createElement("textarea");
  answer.setAttribute("aria-label", "Corrected answer");
  answer.value = history[index].content;
  const row = document.createElement("div");
  row.className = "row";
  const submit = document.createElement("button");
  submit.type = "submit";
  submit.className = "primary";
  submit.textContent = "Send correction";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  const outcome = document.createElement("span");
  outcome.setAttribute("role", "status");
  row.append(submit, cancel, outcome);
  form.append(answer, row);
  bubble.append(form);
  answer.focus();
  cancel.addEventListener("click", () => {
    form.remove();
    button.disabled = false;
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sendCorrection(bubble, index, answer.value.trim(), { form, submit, outcome, button });
  });
}

async function sendCorrection(bubble, index, corrected, parts) {
  if (!corrected) {
    showOutcome(parts.outcome, "Write the answer you wanted first.", false);
    return;
  }
  parts.submit.disabled = true;
  showOutcome(parts.outcome, "sending…", null);
  const messages = [...history.slice(0, index), { role: "assistant", content: corrected }];
  let result;
  try {
    result = await requestJSON("/v1/feedback", { method: "POST", body: JSON.stringify({ messages }) });
  } catch (error) {
    result = { status: 0, ok: false, body: { error: { message: `the server cannot be reached (${error})` } } };
  }
  parts.submit.disabled = false;
  if (!result.ok) {
    const advice = keyAdvice(result);
    showOutcome(parts.outcome, advice ?? errorMessage(result), false);
    if (advice) ui.apiKey.focus();
    return;
  }
  history[index].content = corrected;
  bubble.querySelector(".text").textContent = corrected;
  parts.form.remove();
  const meta = bubble.querySelector(".meta");
  const ack = document.createElement("span");
  ack.className = "ok";
  ack.setAttribute("role", "status");
  ack.textContent = `Correction saved as training sample #${result.body.ids[0]}`;
  meta.append(ack);
  parts.button.disabled = false;
}

function showOutcome(node, text, ok) {
  node.textContent = text;
  node.className = ok === false ? "error" : "muted";
}

async function refreshFacts() {
  try {
    const result = await requestJSON("/v1/stats?window_s=1");
    keyNeeded = keyAdvice(result) !== null;
    setConnection(ui.connection.dataset.state);
    if (!result.ok) return;
    ui.model.textContent = result.body.model;
    if (result.body.adapters) ui.adapter.textContent = `v${result.body.adapters.active}`;
  } catch {
    // The server is away; the connection status already says so.
  }
}

function newChat() {
  if (current) stopTurn();
  history.length = 0;
  ui.messages.replaceChildren();
  ui.prompt.focus();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || ui.send.disabled) return;
  ui.prompt.value = "";
  startTurn(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", stopTurn);
ui.newChat.addEventListener("click", newChat);
bindApiKeyField(ui.apiKey, reconnectWithNewKey);
connect();
refreshFacts();
setInterval(refreshFacts, 5000);
