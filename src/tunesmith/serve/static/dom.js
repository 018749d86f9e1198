// Small DOM and HTTP helpers. User text only ever goes into textContent or attribute values,
// never into innerHTML, so a data row holding <script> shows as text.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector) => document.querySelector(selector);

export function notice(text, isError = false) {
  const box = $("#notice");
  box.textContent = text;
  box.className = isError ? "error" : "";
}

export async function api(path, { method = "GET", body, raw } = {}) {
  const options = { method, headers: {} };
  if (raw !== undefined) options.body = raw;
  else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {  // the server is down or unreachable: say so, do not pretend
    const banner = $("#offline");
    if (banner) banner.hidden = false;
    throw new Error("the studio server cannot be reached");
  }
  if ($("#offline")) $("#offline").hidden = true;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || `${response.status} ${response.statusText}`;
    notice(message, true);
    throw new Error(message);
  }
  return data;
}

// POST to an OpenAI streaming endpoint; calls onDelta(text) for each piece, returns the whole text.
export async function streamChat(body, onDelta) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ...body, stream: true }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", whole = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices[0].delta.content || "";
      whole += piece;
      if (piece) onDelta(piece, whole);
    }
  }
  return whole;
}

export function table(node, headers, rows) {
  node.replaceChildren(el("tr", {}, headers.map((h) => el("th", {}, h))),
    ...rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell)))));
}

export function bubble(role, text) {
  return el("div", { class: `bubble ${role}` }, text);
}
