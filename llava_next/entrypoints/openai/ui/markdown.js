// Safe Markdown for model text: headings, paragraphs, lists (nested by indentation), tables, fenced code blocks,
// block quotes, rules; inline code, bold, italic, strike-through and http(s)/mailto links.
// Every piece of text becomes a Text node (Node.append / textContent); no string is ever parsed as HTML, so
// `<script>` or `<img onerror=...>` in the model's text shows as those characters. Leaves out: raw HTML,
// images, reference links, footnotes, setext headings.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const DIVIDER = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",            // 1,2: code span
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",              // 3: bold
  "__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",               // 4: bold
  "~~(?=\\S)([\\s\\S]*?\\S)~~",                      // 5: strike
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",            // 6: italic
  "(?<!\\w)_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)", // 7: italic
  "\\[([^\\]\\n]+)\\]\\(([^()\\s]+)\\)",             // 8,9: link
].join("|"), "g");

function el(tag, cls) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
}

function safeHref(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

/** Inline Markdown of `text` appended to `parent` as elements and Text nodes. */
export function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    let node;
    if (m[1] !== undefined) {
      node = el("code");
      node.textContent = m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
    } else if (m[3] !== undefined || m[4] !== undefined) {
      node = el("strong");
      inline(node, m[3] ?? m[4]);
    } else if (m[5] !== undefined) {
      node = el("del");
      inline(node, m[5]);
    } else if (m[6] !== undefined || m[7] !== undefined) {
      node = el("em");
      inline(node, m[6] ?? m[7]);
    } else {
      const href = safeHref(m[9]);
      if (href === null) {
        parent.append(m[0]);
        continue;
      }
      node = el("a");
      node.href = href;
      node.rel = "noopener noreferrer nofollow";
      node.target = "_blank";
      inline(node, m[8]);
    }
    parent.append(node);
  }
  if (last < text.length) parent.append(text.slice(last));
}

function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function codeBlock(code, lang) {
  const pre = el("pre");
  const node = el("code", lang ? "lang-" + lang.replace(/[^\w-]/g, "") : "");
  node.textContent = code;
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => { copy.textContent = "Copied"; }, () => {});
  });
  pre.append(node, copy);
  return pre;
}

function table(lines) {
  const node = el("table");
  const aligns = cells(lines[1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : ""));
  const head = el("thead");
  const body = el("tbody");
  lines.forEach((line, row) => {
    if (row === 1) return;
    const tr = el("tr");
    cells(line).slice(0, Math.max(aligns.length, 1)).forEach((text, col) => {
      const cell = el(row === 0 ? "th" : "td");
      if (aligns[col]) cell.style.textAlign = aligns[col];
      inline(cell, text);
      tr.append(cell);
    });
    (row === 0 ? head : body).append(tr);
  });
  node.append(head, body);
  return node;
}

function list(lines, start) {
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    while (i < lines.length && lines[i].trim() && lines[i].search(/\S/) > indent) body.push(lines[i++].slice(indent + 2));
    const item = el("li");
    if (body.length === 1) inline(item, body[0]);
    else item.append(render(body.join("\n")));
    node.append(item);
    const next = (j) => ITEM.exec(lines[j] ?? "")?.[1].length === indent;
    while (i + 1 < lines.length && !lines[i].trim() && next(i + 1)) i++;  // a blank line inside the list
  }
  return [node, i];
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line) || QUOTE.test(line) ||
    (line.includes("|") && i + 1 < lines.length && DIVIDER.test(lines[i + 1]) && lines[i + 1].includes("-"));
}

/** The Markdown `text` as a DocumentFragment of safe elements. */
export function render(text) {
  const out = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(m[1])) body.push(lines[i++]);
      i++;  // the closing fence (or the end of an unfinished, still-streaming block)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + m[1].length);
      inline(h, m[2]);
      out.append(h);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && DIVIDER.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(lines[i++]);
      out.append(table(rows));
    } else if (ITEM.test(line)) {
      const [node, next] = list(lines, i);
      out.append(node);
      i = next;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
      const quote = el("blockquote");
      quote.append(render(body.join("\n")));
      out.append(quote);
    } else {
      const body = [line];
      i++;
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) body.push(lines[i++]);
      const p = el("p");
      inline(p, body.join("\n"));
      out.append(p);
    }
  }
  return out;
}
