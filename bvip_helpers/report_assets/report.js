/* The BVIP error gallery: plain JavaScript, no library, no network.
 * Every element is built with createElement and textContent: text from the data never becomes markup.
 * The filter state lives in the URL hash (view, facets, page, size, A/B models), so a view can be bookmarked. */
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("bvip-data").textContent);
  const FACETS = [
    ["model", "Model"], ["type", "Error type"], ["object", "Object class"], ["field", "Field"],
    ["crowding", "Close classes in the scene"], ["flag", "Flags"],
  ];
  const FLAGS = { suspect: "possible label error", disagree: "models disagree" };
  const TYPES = Object.fromEntries(DATA.types.map((t) => [t.key, t]));
  const HIGH = 90, MID = 40;

  // --- small DOM helpers ----------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);
  const positions = (list) => (list && list.length ? list.join(", ") : "nothing");
  const objects = (map) => Object.entries(map || {}).map(([name, where]) => name + " " + positions(where)).join("; ") || "nothing";
  const fmt = (value, digits) => (value === null || value === undefined ? "n/a"
    : typeof value === "number" && !Number.isInteger(value) ? value.toFixed(digits === undefined ? 3 : digits) : String(value));
  const digits = (column) => (column.startsWith("seconds") ? 2 : column.startsWith("words") || column.includes("severity") ? 1 : 3);
  const band = (severity) => (severity >= HIGH ? "high" : severity >= MID ? "mid" : "low");

  // --- what each record offers to the facets ------------------------------------------
  const images = DATA.images;
  const records = DATA.records.map((r, index) => {
    const image = images[r.image];
    const types = r.errors.length ? [...new Set(r.errors.map((e) => e.type))] : ["none"];
    const flags = [];
    if (image.suspect.length) flags.push("suspect");
    if (image.disagree) flags.push("disagree");
    return Object.assign({}, r, {
      index,
      facets: {
        model: [String(r.model)], type: types,
        object: [...new Set(r.errors.map((e) => e.object).filter(Boolean))],
        field: [...new Set(r.errors.map((e) => e.field).filter(Boolean))],
        crowding: [image.crowding], flag: flags,
      },
    });
  });
  records.sort((a, b) => b.severity - a.severity || images[a.image].name.localeCompare(images[b.image].name) || a.model - b.model);
  const byImage = images.map(() => ({}));
  for (const r of records) byImage[r.image][r.model] = r;

  const facetValues = {
    model: DATA.models.map((name, i) => [String(i), name]),
    type: [...DATA.types.map((t) => [t.key, t.label]), ["none", "no errors"]],
    object: DATA.classes.map((c) => [c, c]),
    field: Object.entries(DATA.fields),
    crowding: ["0", "1", "2", "3+"].map((c) => [c, c === "0" ? "none close" : c === "3+" ? "3 or more" : c]),
    flag: Object.entries(FLAGS),
  };

  // --- state <-> URL hash ----------------------------------------------------------------
  const state = { view: "cards", page: 1, size: DATA.pageSize, filters: {}, a: 0, b: Math.min(1, DATA.models.length - 1),
                  awrong: false, disagree: false, suspect: false };
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.view = params.get("view") === "sbs" ? "sbs" : "cards";
    state.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    state.size = Math.min(500, Math.max(1, parseInt(params.get("size") || String(DATA.pageSize), 10) || DATA.pageSize));
    for (const [key] of FACETS) state.filters[key] = new Set(params.getAll(key));
    const pick = (name, fallback) => {
      const value = parseInt(params.get(name), 10);
      return value >= 0 && value < DATA.models.length ? value : fallback;
    };
    state.a = pick("a", 0);
    state.b = pick("b", Math.min(1, DATA.models.length - 1));
    state.awrong = params.get("awrong") === "1";
    state.disagree = params.get("disagree") === "1";
    state.suspect = params.get("suspect") === "1";
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.view !== "cards") params.set("view", state.view);
    for (const [key] of FACETS) for (const value of state.filters[key]) params.append(key, value);
    if (state.page > 1) params.set("page", String(state.page));
    if (state.size !== DATA.pageSize) params.set("size", String(state.size));
    if (state.view === "sbs") {
      params.set("a", String(state.a));
      params.set("b", String(state.b));
      if (state.awrong) params.set("awrong", "1");
      if (state.disagree) params.set("disagree", "1");
      if (state.suspect) params.set("suspect", "1");
    }
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  // --- filtering ---------------------------------------------------------------------------
  function matches(record, skip) {
    for (const [key] of FACETS) {
      if (key === skip) continue;
      const wanted = state.filters[key];
      if (wanted.size && !record.facets[key].some((v) => wanted.has(v))) return false;
    }
    return true;
  }
  function facetCounts() {
    const counts = {};
    for (const [key] of FACETS) {
      counts[key] = {};
      for (const record of records) {
        if (!matches(record, key)) continue;
        for (const value of record.facets[key]) counts[key][value] = (counts[key][value] || 0) + 1;
      }
    }
    return counts;
  }

  // --- summary -------------------------------------------------------------------------------
  function renderSummary() {
    // One column per model, and the ground-truth priority caption as the reference for spoken order.
    const rows = DATA.summary;
    const truth = DATA.truthSpoken;
    const heard = (s, which) => (s["words to " + which + " hazard"] === null ? "n/a"
      : fmt(s["words to " + which + " hazard"], 1) + " words · " + fmt(s["seconds to " + which + " hazard"], 1) + " s");
    const never = (s) => s["no hazard heard"] + " of " + s["scenes with hazards"];
    const spoken = [["first close hazard heard after", (s) => heard(s, "first")],
                    ["last close hazard heard after", (s) => heard(s, "last")],
                    ["scenes where no hazard is heard", never]];
    const plain = rows.length ? Object.keys(rows[0]).filter((c) => c !== "model" && !c.includes("hazard")) : [];
    const table = el("table", {}, el("caption", { class: "keys" },
      "Field accuracy counts a missing field as wrong. Spoken order: mean words (seconds at " + DATA.wordsPerMinute
      + " words a minute) before a listener hears the first and the last close hazard of the scene."));
    table.append(el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "" }),
      ...rows.map((row) => el("th", { scope: "col", text: row.model })),
      el("th", { scope: "col", text: "priority caption (truth)" }))));
    const body = el("tbody");
    for (const metric of plain) {
      body.append(el("tr", {}, el("th", { scope: "row", text: metric }),
        ...rows.map((row) => el("td", { class: "num", text: fmt(row[metric], digits(metric)) })), el("td")));
    }
    for (const [label, show] of spoken) {
      body.append(el("tr", {}, el("th", { scope: "row", text: label }),
        ...rows.map((row) => el("td", { class: "num", text: show(row) })), el("td", { class: "num", text: show(truth) })));
    }
    table.append(body);
    $("summary").replaceChildren(table);
    $("subtitle").textContent = DATA.records.length + " cards: " + images.length + " " + DATA.split + " images × "
      + DATA.models.length + " model" + (DATA.models.length === 1 ? "" : "s") + " (" + DATA.models.join(", ") + ")";
  }

  // --- facets -------------------------------------------------------------------------------
  function renderFacets(counts) {
    const aside = $("facets");
    const focusedId = document.activeElement && document.activeElement.id;
    const children = [];
    if (state.view === "cards") {
      children.push(el("button", { type: "button", class: "clear", text: "Clear all filters", onclick: () => {
        for (const [key] of FACETS) state.filters[key].clear();
        state.page = 1; update();
      } }));
      for (const [key, title] of FACETS) {
        const set = el("fieldset", {}, el("legend", { text: title }));
        for (const [value, label] of facetValues[key]) {
          const n = counts[key][value] || 0;
          if (!n && !state.filters[key].has(value) && key !== "model") continue;
          const id = "f-" + key + "-" + value.replace(/[^A-Za-z0-9_-]/g, "_");
          const box = el("input", { type: "checkbox", id, "data-facet": key, value, checked: state.filters[key].has(value),
            onchange: (event) => {
              if (event.target.checked) state.filters[key].add(value); else state.filters[key].delete(value);
              state.page = 1; update();
            } });
          set.append(el("label", { for: id, class: n ? null : "empty" }, box, el("span", { text: label }),
            el("span", { class: "count", text: String(n), "aria-label": n + " cards" })));
        }
        children.push(set);
      }
    } else {
      const select = (name, title) => el("label", {}, title + " ", el("select", { id: "sbs-" + name, onchange: (event) => {
        state[name] = parseInt(event.target.value, 10); state.page = 1; update();
      } }, ...DATA.models.map((m, i) => { const o = el("option", { value: i, text: m }); o.selected = state[name] === i; return o; })));
      const check = (name, title) => el("label", {}, el("input", { type: "checkbox", id: "sbs-" + name, checked: state[name],
        onchange: (event) => { state[name] = event.target.checked; state.page = 1; update(); } }), " " + title);
      children.push(el("fieldset", {}, el("legend", { text: "Compare two models" }), select("a", "A"), select("b", "B"),
        check("awrong", "A wrong, B right (sorted by the severity difference)")));
      children.push(el("fieldset", {}, el("legend", { text: "Rows" }), check("disagree", "only where the models disagree"),
        check("suspect", "only possible label errors")));
    }
    aside.replaceChildren(...children);
    if (focusedId && $(focusedId)) $(focusedId).focus();
  }

  // --- one card ----------------------------------------------------------------------------
  function overlay(truth) {
    const thirds = ["left", "center", "right"].map((side) => ({ side, far: [], ground: [], close: [] }));
    const at = (side) => thirds.find((t) => t.side === side);
    const add = (map, kind) => {
      for (const [name, where] of Object.entries(map)) {
        const perSide = {};
        for (const side of where) perSide[side] = (perSide[side] || 0) + 1;
        for (const [side, n] of Object.entries(perSide)) {
          if (at(side)) at(side)[kind].push(el("span", { class: "tag " + kind, text: name + (n > 1 ? " ×" + n : "") + " · " + kind }));
        }
      }
    };
    add(truth.far, "far");
    add(truth.near, "close");
    const sidewalk = truth.fields.sidewalk_pos, road = truth.fields.road_pos;
    if (at(sidewalk)) at(sidewalk).ground.push(el("span", { class: "tag ground", text: "sidewalk" }));
    if (road === "front") at("center").ground.push(el("span", { class: "tag ground", text: "road ahead" }));
    else if (at(road)) at(road).ground.push(el("span", { class: "tag ground", text: "road" }));
    return el("div", { class: "overlay", "aria-hidden": "true" }, ...thirds.map((t) => el("div", { class: "third" },
      el("div", { class: "far" }, ...t.far), el("div", { class: "ground" }, ...t.ground), el("div", { class: "close" }, ...t.close))));
  }

  function picture(image, attributes) {  // a missing or unreadable image says so: never another picture instead
    if (!image.thumb) return el("div", { class: "noimage", role: "img", text: "No picture: " + image.unreadable });
    return el("img", Object.assign({ src: image.thumb, alt: "Ground truth: " + image.truth.caption }, attributes));
  }

  function scene(image) {
    const img = picture(image, { decoding: "async" });
    return el("figure", { class: "scene" }, el("div", { class: "frame" }, img, overlay(image.truth)),
      el("figcaption", { text: "Truth drawn over the image: thirds, close objects (solid) and far ones (dashed)." }));
  }

  function chips(record, image) {
    const list = el("ul", { class: "chips", "aria-label": "errors" });
    if (!record.errors.length) list.append(el("li", { class: "chip none", text: "no errors" }));
    for (const e of record.errors) {
      const what = e.object || (e.field ? DATA.fields[e.field] : "");
      list.append(el("li", { class: "chip " + band(e.severity), title: "severity " + e.severity,
        text: TYPES[e.type].label + (what ? ": " + what : "") + " (" + e.severity + ")" }));
    }
    if (image && image.suspect.length) list.append(el("li", { class: "chip flag", text: "possible label error" }));
    return list;
  }

  function diffTable(truth, prediction) {
    const rows = Object.entries(DATA.fields).map(([key, label]) => [label, truth.fields[key], prediction.fields[key]]);
    rows.push(["Nearby", objects(truth.near), prediction.sections.nearby === undefined ? null : objects(prediction.near)]);
    rows.push(["Far", objects(truth.far), prediction.sections.far === undefined ? (Object.keys(truth.far).length ? null : "nothing") : objects(prediction.far)]);
    const table = el("table", { class: "diff" }, el("thead", {}, el("tr", {},
      el("th", { scope: "col", text: "" }), el("th", { scope: "col", text: "truth" }),
      el("th", { scope: "col", text: "prediction" }), el("th", { scope: "col", text: "" }))));
    const body = el("tbody");
    for (const [label, want, got] of rows) {
      const status = got === null || got === undefined ? "∅ missing" : got === want ? "✓ same" : "✗ differs";
      body.append(el("tr", { class: status.startsWith("✓") ? "good" : "bad" }, el("th", { scope: "row", text: label }),
        el("td", { text: want }), el("td", { text: got === null || got === undefined ? "—" : got }),
        el("td", { class: "status", text: status })));
    }
    table.append(body);
    return table;
  }

  function speak(text) {
    if (!("speechSynthesis" in window) || !text) return;
    window.speechSynthesis.cancel();
    const utterance = new SpeechSynthesisUtterance(text);
    utterance.rate = 1;
    window.speechSynthesis.speak(utterance);
  }
  function listenButton(record, image) {
    const text = record.prediction.text;
    const model = DATA.models[record.model];
    const available = "speechSynthesis" in window && !!text;
    return el("button", { type: "button", class: "listen", disabled: !available,
      "aria-label": "Listen to the " + model + " caption of " + image.name,
      title: available ? "Read the caption aloud (browser speech synthesis)" : "No caption, or no speech synthesis in this browser",
      onclick: () => speak(text), text: "▶ Listen" });
  }

  function spokenLine(record, image) {
    const s = record.spoken, t = image.truth.spoken;
    if (!s.hazards) return el("p", { class: "spoken", text: "Spoken order: no close hazard in this scene." });
    const heard = s.words_to_first === null ? "no close hazard named"
      : "first close hazard after " + s.words_to_first + " words (" + s.seconds_to_first + " s)"
        + (s.words_to_last === null ? (s.hazards > 1 ? ", " + (s.hazards - s.heard) + " never named" : "")
          : s.hazards > 1 ? ", last after " + s.words_to_last + " words (" + s.seconds_to_last + " s)" : "");
    return el("p", { class: "spoken", text: "Spoken order: " + heard + "; the priority caption: "
      + t.words_to_first + " words (" + t.seconds_to_first + " s)." });
  }

  function card(record, rank) {
    const image = images[record.image];
    const model = DATA.models[record.model];
    const title = el("h3", { id: "card-" + record.index }, image.name + " · " + model);
    const details = el("div", { class: "details" }, chips(record, image));
    if (record.errors.length) details.append(el("ul", { class: "why", "aria-label": "why" },
      ...record.errors.map((e) => el("li", { text: e.why }))));
    details.append(diffTable(image.truth, record.prediction));
    const text = record.prediction.text;
    details.append(el("p", { class: text === null ? "caption missing" : "caption" },
      text === null ? "No prediction for this image." : text));
    details.append(spokenLine(record, image));
    for (const reason of image.suspect) details.append(el("p", { class: "suspect", text: "Possible label error: " + reason }));
    details.append(listenButton(record, image));
    return el("article", { class: "card", tabindex: "0", "aria-labelledby": title.id, "data-severity": record.severity,
      "data-index": record.index },
      el("header", {}, el("span", { class: "rank", text: "#" + rank }), title,
        el("span", { class: "severity", text: "severity " + record.severity })),
      el("div", { class: "card-body" }, scene(image), details));
  }

  // --- pages ---------------------------------------------------------------------------------
  function pager(total, unit) {
    const pages = Math.max(1, Math.ceil(total / state.size));
    state.page = Math.min(state.page, pages);
    const make = () => el("div", { class: "pager" },
      el("button", { type: "button", text: "← Previous page", disabled: state.page <= 1,
        onclick: () => { state.page -= 1; update(true); } }),
      el("span", { text: "Page " + state.page + " of " + pages + " · " + total + " " + unit }),
      el("button", { type: "button", text: "Next page →", disabled: state.page >= pages,
        onclick: () => { state.page += 1; update(true); } }),
      el("label", {}, "per page ", (() => {
        const s = el("select", { onchange: (event) => { state.size = parseInt(event.target.value, 10); state.page = 1; update(); } },
          ...[12, 24, 48, 96].concat([12, 24, 48, 96].includes(state.size) ? [] : [state.size]).map((n) => {
            const o = el("option", { value: n, text: String(n) }); o.selected = n === state.size; return o;
          }));
        return s;
      })()));
    $("pager-top").replaceChildren(make());
    $("pager-bottom").replaceChildren(make());
    return [(state.page - 1) * state.size, state.page * state.size];
  }

  function renderCards() {
    const shown = records.filter((r) => matches(r));
    const [start, end] = pager(shown.length, "cards");
    $("status").textContent = shown.length + " of " + records.length + " cards match the filters";
    $("cards").replaceChildren(...shown.slice(start, end).map((r, i) => card(r, start + i + 1)));
  }

  function sbsRows() {
    let rows = images.map((image, i) => ({ image, i, worst: Math.max(...Object.values(byImage[i]).map((r) => r.severity)) }));
    if (state.disagree) rows = rows.filter((row) => row.image.disagree);
    if (state.suspect) rows = rows.filter((row) => row.image.suspect.length);
    const sev = (row, m) => (byImage[row.i][m] ? byImage[row.i][m].severity : 0);
    const right = (row, m) => Boolean(byImage[row.i][m]) && !byImage[row.i][m].errors.length;
    if (state.awrong) {  // A has an error, B has none: what B gets right that A does not
      rows = rows.filter((row) => byImage[row.i][state.a] && !right(row, state.a) && right(row, state.b))
        .map((row) => Object.assign(row, { delta: sev(row, state.a) - sev(row, state.b) }));
      rows.sort((x, y) => y.delta - x.delta || x.image.name.localeCompare(y.image.name));
    } else {
      rows.sort((x, y) => y.worst - x.worst || x.image.name.localeCompare(y.image.name));
    }
    return rows;
  }

  function truthLine(truth) {
    return "Truth: " + Object.entries(DATA.fields).map(([key, label]) => label + " " + truth.fields[key]).join(", ")
      + "; close: " + objects(truth.near) + "; far: " + objects(truth.far);
  }

  function renderSideBySide() {
    const rows = sbsRows();
    const [start, end] = pager(rows.length, "images");
    $("status").textContent = rows.length + " of " + images.length + " images" + (state.awrong
      ? ": " + DATA.models[state.a] + " wrong, " + DATA.models[state.b] + " right, largest difference first" : "");
    const head = el("tr", {}, el("th", { scope: "col", text: "image and truth" }),
      ...DATA.models.map((m) => el("th", { scope: "col", text: m })));
    if (state.awrong) head.append(el("th", { scope: "col", text: "severity " + DATA.models[state.a] + " − " + DATA.models[state.b] }));
    const body = el("tbody");
    for (const row of rows.slice(start, end)) {
      const tr = el("tr", { tabindex: "0", "data-image": row.image.name },
        el("td", { class: "image" }, picture(row.image, { loading: "lazy" }),
          el("div", { text: row.image.name }), el("div", { class: "truth", text: truthLine(row.image.truth) }),
          row.image.disagree ? el("div", { text: "models disagree" }) : null,
          ...row.image.suspect.map((reason) => el("div", { class: "suspect", text: "Possible label error: " + reason }))));
      DATA.models.forEach((m, mi) => {
        const record = byImage[row.i][mi];
        if (!record) { tr.append(el("td", { text: "—" })); return; }
        tr.append(el("td", {}, el("div", { text: "severity " + record.severity }), chips(record, null),
          el("p", { class: record.prediction.text === null ? "caption missing" : "caption",
            text: record.prediction.text === null ? "No prediction." : record.prediction.text }),
          listenButton(record, row.image)));
      });
      if (state.awrong) tr.append(el("td", { class: "diffsev", text: "+" + row.delta }));
      body.append(tr);
    }
    $("sbs").replaceChildren(el("table", { id: "sbs-table" }, el("thead", {}, head), body));
  }

  function update(focusResults) {
    $("view-cards").setAttribute("aria-pressed", String(state.view === "cards"));
    $("view-sbs").setAttribute("aria-pressed", String(state.view === "sbs"));
    $("cards").hidden = state.view !== "cards";
    $("sbs").hidden = state.view !== "sbs";
    renderFacets(state.view === "cards" ? facetCounts() : null);
    if (state.view === "cards") { $("sbs").replaceChildren(); renderCards(); } else { $("cards").replaceChildren(); renderSideBySide(); }
    writeHash();
    if (focusResults) $("results").focus();
  }

  // --- keyboard ------------------------------------------------------------------------------
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement) return;
    const item = target.closest ? target.closest(".card, #sbs tbody tr") : null;
    const key = event.key;
    if (item && ["j", "k", "ArrowDown", "ArrowUp"].includes(key)) {
      const list = [...document.querySelectorAll(state.view === "cards" ? ".card" : "#sbs tbody tr")];
      const next = list[list.indexOf(item) + (key === "j" || key === "ArrowDown" ? 1 : -1)];
      if (next) { next.focus(); event.preventDefault(); }
    } else if (key === "n" || key === "p") {
      const button = document.querySelector("#pager-bottom button:" + (key === "n" ? "last-of-type" : "first-of-type"));
      if (button && !button.disabled) { button.click(); event.preventDefault(); }
    } else if (key === "l" && item) {
      const button = item.querySelector("button.listen:not([disabled])");
      if (button) button.click();
    }
  });

  $("view-cards").addEventListener("click", () => { state.view = "cards"; state.page = 1; update(); });
  $("view-sbs").addEventListener("click", () => { state.view = "sbs"; state.page = 1; update(); });
  window.addEventListener("hashchange", () => { readHash(); update(); });
  readHash();
  renderSummary();
  update();
  window.bvipReport = { readyAt: performance.now(), records: records.length, images: images.length };
})();
