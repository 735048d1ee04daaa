"""The lens as one self-contained interactive page (no network): a layer × position grid per lens.

:func:`lens_page` turns a :class:`~njtc_solve.evaluation.lens.Trajectory` into one HTML file, its data
embedded as JSON (``<script type="application/json" id="lens-data">``): the distinct token texts
once, each cell's top-k as indices into them, figures to 3 significant digits. Each cell, a
``<td class="cell">`` with ``data-layer``, ``data-position`` and ``data-token``, shows a lens's
top-1 token coloured by a statistic, or lens A minus lens B; :func:`read_page_data` reads the data back.

Examples
--------
>>> from njtc_solve.evaluation.lens import ShortcutLens
>>> traj = ShortcutLens.from_model(model, None, tokenizer).trajectory(["def add(a, b):", "import os"], k=3)
>>> page = traj.to_html("lens.html")
>>> page.startswith("<!DOCTYPE html>") and "http" not in page.split("<body>")[1]
True
>>> data = read_page_data(page)
>>> data["methods"], data["prompts"][1]["tokens"] == traj.decode(traj.token_ids[1])
(['identity'], True)
"""

from __future__ import annotations

import html
import json
import re

import numpy as np

__all__ = ["PAGE_FORMAT", "STATISTICS", "inline_frame", "lens_page", "page_data", "read_page_data"]

PAGE_FORMAT = "njtc-lens-page"

STATISTICS = {  # statistic -> its label on the page (fields of Trajectory)
    "final_prob": "probability of the model's top-1",
    "final_rank": "rank of the model's top-1",
    "kl": "KL(final ‖ lens), nats",
    "entropy": "entropy of the lens, nats",
}

_FIELDS = ("topk", "topk_p", "entropy", "kl", "valid", "final_prob", "final_rank")  # per cell, in this order


def _rounded(values: np.ndarray) -> list:
    """Numbers to 3 significant digits (what the page shows), NaN as ``null``: JSON stays short."""
    return [None if x != x else float(f"{x:.3g}") for x in np.asarray(values, np.float64).ravel().tolist()]


def page_data(traj, *, title: str | None = None, prompts: list[str] | None = None,
              meta: dict | None = None) -> dict:
    """The data the page embeds: the distinct token texts and, per prompt, its tokens and each per-cell field
    as one flat list in ``[method, layer, position(, k)]`` order."""
    every, texts = traj._token_texts()
    strings = sorted(set(texts))
    where = {s: i for i, s in enumerate(strings)}
    lookup = np.full(int(every.max()) + 2, -1, np.int64)  # token id -> index of its text; -1 (missing) -> -1
    lookup[every] = [where[t] for t in texts]
    has_final = traj.final_prob is not None
    fields = [f for f in _FIELDS if has_final or not f.startswith("final_")]
    k = int(traj.topk_ids.shape[-1])
    out_prompts = []
    for p, tokens in enumerate(traj.token_ids):
        n = len(tokens)
        cells = {"topk": lookup[traj.topk_ids[:, p, :, :n]].ravel().tolist(),
                 "topk_p": _rounded(traj.topk_probs[:, p, :, :n]), "entropy": _rounded(traj.entropy[:, p, :, :n]),
                 "kl": _rounded(traj.kl[:, p, :, :n]), "valid": traj.valid[:, p, :, :n].astype(int).ravel().tolist()}
        if has_final:
            cells["final_prob"] = _rounded(traj.final_prob[:, p, :, :n])
            cells["final_rank"] = traj.final_rank[:, p, :, :n].ravel().tolist()
        out_prompts.append({
            "text": prompts[p] if prompts is not None and p < len(prompts) else None,
            "tokens": [int(lookup[t]) for t in tokens], "final": [int(lookup[t]) for t in traj.final_top1[p, :n]],
            "cells": cells,
        })
    vocab = getattr(traj.tokenizer, "vocab_size", None) if traj.tokenizer is not None else None
    return {"format": PAGE_FORMAT, "version": 1, "title": title or "njtc_solve lens", "meta": meta or {},
            "methods": list(traj.methods), "n_layers": int(traj.n_layers), "k": k,
            "vocab_size": int(vocab) if vocab else None,
            "statistics": {name: label for name, label in STATISTICS.items() if has_final or name in ("kl", "entropy")},
            "fields": {name: k if name.startswith("topk") else 1 for name in fields},
            "strings": strings, "prompts": out_prompts}


def read_page_data(page: str) -> dict:
    """The data embedded in a page of :func:`lens_page`, with per prompt ``tokens`` and ``final`` as texts and
    ``arrays``: field -> array ``(method, layer, position[, k])`` (``topk`` as texts)."""
    found = re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S)
    if found is None:
        raise ValueError("not a lens page: no embedded lens data")
    data = json.loads(found.group(1))
    strings = np.array(data["strings"] + [None], dtype=object)  # index -1: none
    n_m, n_l = len(data["methods"]), data["n_layers"] + 1
    for prompt in data["prompts"]:
        shape = (n_m, n_l, len(prompt["tokens"]))
        arrays = {name: np.array([np.nan if v is None else v for v in prompt["cells"][name]], np.float64)
                  .reshape(shape + ((count,) if count > 1 else ())) for name, count in data["fields"].items()}
        arrays["topk"] = strings[arrays["topk"].astype(np.int64)]
        arrays["valid"] = arrays["valid"].astype(bool)
        if "final_rank" in arrays:
            arrays["final_rank"] = arrays["final_rank"].astype(np.int64)
        prompt["arrays"] = arrays
        prompt["tokens"] = [data["strings"][i] for i in prompt["tokens"]]
        prompt["final"] = [data["strings"][i] for i in prompt["final"]]
    return data


def lens_page(traj, *, title: str | None = None, prompts: list[str] | None = None, meta: dict | None = None) -> str:
    """The whole page of a trajectory, as text.

    Parameters
    ----------
    traj : Trajectory
    title : str, optional
        The page's title (default ``"njtc_solve lens"``).
    prompts : list of str, optional
        The prompts' texts, for the prompt selector (default: their tokens).
    meta : dict, optional
        Recorded in the embedded data.
    """
    data = page_data(traj, title=title, prompts=prompts, meta=meta)
    embedded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return (_TEMPLATE.replace("__TITLE__", html.escape(data["title"]))
            .replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT).replace("__DATA__", embedded))


def inline_frame(page: str, height: int = 720) -> str:
    """A page inline in a notebook: an ``iframe`` whose ``srcdoc`` holds it (scripts run sandboxed)."""
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;border:0" '
            f'sandbox="allow-scripts"></iframe>')


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <div id="heading"><h1>__TITLE__</h1><p id="subtitle"></p></div>
  <form id="controls" onsubmit="return false">
    <label>Prompt <select id="prompt"></select></label>
    <label>Lens <select id="lens"></select></label>
    <label>Compare with <select id="compare"></select></label>
    <label>Colour by <select id="statistic"></select></label>
    <div id="legend" aria-live="polite"><span id="legend-low"></span><span id="legend-bar"></span><span id="legend-high"></span>
      <span id="legend-label"></span></div>
  </form>
</header>
<main>
  <div id="grid-wrap"><table id="grid" role="grid" aria-label="top-1 token per layer and position"></table></div>
  <aside id="details" aria-live="polite"><p class="hint">Hover, focus (arrow keys) or click a cell
    to see its top tokens; a click pins the cell.</p></aside>
</main>
<p id="status" role="status">Loading…</p>
<script type="application/json" id="lens-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; font-size: 14px; color: #1b1b1b; }
body { margin: 0; display: flex; flex-direction: column; height: 100vh; background: #fafafa; }
header { padding: 6px 12px; border-bottom: 1px solid #ddd; background: #fff; }
#heading { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 12px; margin-bottom: 4px; }
h1 { font-size: 16px; margin: 0; }
#subtitle { margin: 0; color: #555; font-size: 12px; }
#controls { display: flex; flex-wrap: wrap; gap: 4px 16px; }
#controls select { font-size: 13px; max-width: 28em; }
#legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #333; }
#legend-bar { display: inline-block; width: 220px; height: 12px; border: 1px solid #999; }
main { flex: 1; display: flex; min-height: 0; }
#grid-wrap { flex: 1; overflow: auto; min-width: 0; }
#grid { border-collapse: separate; border-spacing: 1px; font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace;
        font-size: 11px; }
#grid th { position: sticky; background: #fff; font-weight: normal; color: #333; z-index: 1; }
#grid thead th { top: 0; vertical-align: bottom; padding: 2px 1px; border-bottom: 1px solid #999; }
#grid thead th small { display: block; color: #888; font-size: 9px; }
#grid tbody th { left: 0; text-align: right; padding: 0 4px; z-index: 2; }
#grid thead th.corner { left: 0; z-index: 3; }
td.cell { min-width: 52px; max-width: 52px; height: 15px; line-height: 15px; padding: 0 2px; text-align: center; white-space: nowrap;
          overflow: hidden; cursor: pointer; border-radius: 2px; }
td.cell.invalid { background: repeating-linear-gradient(45deg, #eee, #eee 3px, #fff 3px, #fff 6px); color: #999; }
td.cell.differs { text-decoration: underline dotted; }
td.cell:focus, td.cell.selected { outline: 2px solid #d7191c; outline-offset: -1px; }
td.cell.pinned { outline: 3px solid #000; }
#details { width: 330px; flex: none; overflow: auto; border-left: 1px solid #ddd; padding: 6px 10px; background: #fff;
           font-size: 12px; }
#details h2 { font-size: 13px; margin: 4px 0; }
#details table { border-collapse: collapse; width: 100%; margin-bottom: 8px; }
#details td, #details th { padding: 1px 4px; text-align: left; }
#details td.p { text-align: right; font-variant-numeric: tabular-nums; }
#details td.tok { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
#details tr.final td { font-weight: bold; }
#details .bar { display: inline-block; height: 8px; background: #31688e; vertical-align: middle; }
.hint { color: #555; }
#status { margin: 0; padding: 2px 12px; font-size: 11px; color: #555; border-top: 1px solid #ddd; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("lens-data").textContent);
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
                 "#fde725"];
const PUOR = ["#2d004b", "#542788", "#8073ac", "#b2abd2", "#d8daeb", "#f7f7f7", "#fee0b6", "#fdb863", "#e08214",
              "#b35806", "#7f3b08"];
const $ = id => document.getElementById(id);
const state = {prompt: 0, lens: 0, compare: -1, statistic: Object.keys(DATA.statistics)[0], pinned: null};
const prompts = [];  // decoded per prompt: {n, fields: {name: typed array}}

function decode(prompt) {
  const fields = {};
  for (const [name, count] of Object.entries(DATA.fields)) fields[name] = {array: prompt.cells[name], count};
  return {n: prompt.tokens.length, fields};
}

// one cell's values: m method, l layer, t position
function value(p, name, m, l, t, j = 0) {
  const f = prompts[p].fields[name], n = prompts[p].n;
  const v = f.array[((m * (DATA.n_layers + 1) + l) * n + t) * f.count + j];
  return v === null ? NaN : v;
}
const valid = (p, m, l, t) => value(p, "valid", m, l, t) === 1;
const token = (p, m, l, t, j = 0) => DATA.strings[value(p, "topk", m, l, t, j)];

function shown(text, width = 7) {  // a token as a cell shows it: spaces as ␣, escapes, at most width characters
  let s = "";
  for (const c of text) s += c === " " ? "␣" : c === "\n" ? "\\n" : c === "\t" ? "\\t" : c === "\r" ? "\\r" :
    (c < " " ? "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0") : c);
  s = s || "∅";
  return [...s].length <= width ? s : [...s].slice(0, width - 1).join("") + "…";
}

// the statistic on the colour scale: 1 bright (close to the model's output / confident), 0 dark
const SCALES = {
  final_prob: {raw: (p, m, l, t) => value(p, "final_prob", m, l, t), unit: v => v, lo: "0", hi: "1",
               fmt: v => v.toPrecision(3)},
  final_rank: {raw: (p, m, l, t) => value(p, "final_rank", m, l, t),
               unit: v => 1 - Math.log10(v) / Math.log10(DATA.vocab_size || 1e5), fmt: v => String(v)},
  kl: {raw: (p, m, l, t) => value(p, "kl", m, l, t), fmt: v => v.toPrecision(3)},
  entropy: {raw: (p, m, l, t) => value(p, "entropy", m, l, t), fmt: v => v.toPrecision(3)},
};

const SHORT = {final_prob: "p(model's top-1)", final_rank: "its rank", kl: "KL", entropy: "entropy"};

function extent(p, name) {  // the largest finite value of a statistic over the prompt's lenses
  let top = 0;
  const n = prompts[p].n;
  for (let m = 0; m < DATA.methods.length; m++) for (let l = 0; l <= DATA.n_layers; l++) for (let t = 0; t < n; t++)
    if (valid(p, m, l, t)) { const v = SCALES[name].raw(p, m, l, t); if (isFinite(v) && v > top) top = v; }
  return top;
}

function scaleOf(p, name) {  // {unit: raw -> [0, 1] (1 bright), lo, hi labels}
  const s = SCALES[name];
  if (name === "kl") {
    const top = Math.max(Math.log10(Math.max(extent(p, "kl"), 1)), 0.01);
    return {unit: v => 1 - (Math.log10(Math.max(v, 0.01)) + 2) / (top + 2), lo: "≥ " + Math.pow(10, top).toPrecision(3),
            hi: "≤ 0.01", fmt: s.fmt};
  }
  if (name === "entropy") {
    const top = Math.max(extent(p, "entropy"), 1e-6);
    return {unit: v => 1 - v / top, lo: top.toPrecision(3), hi: "0", fmt: s.fmt};
  }
  if (name === "final_rank") return {unit: s.unit, lo: String(DATA.vocab_size || "1e5"), hi: "1", fmt: s.fmt};
  return {unit: s.unit, lo: s.lo, hi: s.hi, fmt: s.fmt};
}

function colour(stops, x) {
  x = Math.min(1, Math.max(0, isFinite(x) ? x : 0)) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  const a = stops[i], b = stops[i + 1], c = k => Math.round(parseInt(a.substr(k, 2), 16) * (1 - f) +
    parseInt(b.substr(k, 2), 16) * f);
  return [c(1), c(3), c(5)];
}
const css = rgb => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
const ink = rgb => (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) > 140 ? "#000" : "#fff";

function layerName(l) { return l === DATA.n_layers ? "out" : String(l); }
function lensName(m) { const name = DATA.methods[m]; return name === "identity" ? "logit lens (identity)" : name; }

function buildGrid() {
  const p = state.prompt, n = prompts[p].n, grid = $("grid");
  grid.textContent = "";
  const head = grid.createTHead().insertRow();
  const corner = document.createElement("th");
  corner.className = "corner"; corner.textContent = "layer";
  head.appendChild(corner);
  DATA.prompts[p].tokens.forEach((s, t) => {
    const th = document.createElement("th"), small = document.createElement("small");
    small.textContent = t;
    th.append(small, shown(DATA.strings[s]));
    th.title = `position ${t}: ${JSON.stringify(DATA.strings[s])}`;
    head.appendChild(th);
  });
  const body = grid.createTBody();
  for (let l = DATA.n_layers; l >= 0; l--) {
    const row = body.insertRow(), th = document.createElement("th");
    th.textContent = layerName(l); th.scope = "row"; row.appendChild(th);
    for (let t = 0; t < n; t++) {
      const td = row.insertCell();
      td.className = "cell"; td.tabIndex = -1;
      td.dataset.layer = l; td.dataset.position = t;
      td.setAttribute("role", "gridcell");
    }
  }
  const first = grid.querySelector("td.cell");
  if (first) first.tabIndex = 0;
}

function paint() {
  const p = state.prompt, a = state.lens, b = state.compare, name = state.statistic;
  const scale = scaleOf(p, name);
  let diffTop = 0;
  if (b >= 0) {
    for (const td of $("grid").querySelectorAll("td.cell")) {
      const l = +td.dataset.layer, t = +td.dataset.position;
      if (valid(p, a, l, t) && valid(p, b, l, t))
        diffTop = Math.max(diffTop, Math.abs(scale.unit(SCALES[name].raw(p, a, l, t)) - scale.unit(SCALES[name].raw(p, b, l, t))));
    }
    diffTop = Math.max(diffTop, 1e-3);
  }
  for (const td of $("grid").querySelectorAll("td.cell")) {
    const l = +td.dataset.layer, t = +td.dataset.position;
    td.classList.remove("invalid", "differs");
    if (!valid(p, a, l, t) || (b >= 0 && !valid(p, b, l, t))) {
      td.classList.add("invalid"); td.style.background = ""; td.style.color = "";
      td.textContent = "–"; td.dataset.token = ""; td.title = `${lensName(a)} has no map for layer ${l}`;
      continue;
    }
    const top = token(p, a, l, t), va = SCALES[name].raw(p, a, l, t);
    let rgb, title = `layer ${layerName(l)}, position ${t}: ${JSON.stringify(top)}; ${DATA.statistics[name]} ${scale.fmt(va)}`;
    if (b >= 0) {
      const vb = SCALES[name].raw(p, b, l, t), d = scale.unit(va) - scale.unit(vb);
      rgb = colour(PUOR, 0.5 + d / (2 * diffTop));
      if (token(p, b, l, t) !== top) td.classList.add("differs");
      title += ` (${DATA.methods[b]}: ${JSON.stringify(token(p, b, l, t))}, ${scale.fmt(vb)})`;
    } else rgb = colour(VIRIDIS, scale.unit(va));
    td.style.background = css(rgb); td.style.color = ink(rgb);
    td.textContent = shown(top); td.dataset.token = top; td.title = title;
  }
  const bar = $("legend-bar");
  if (b >= 0) {
    bar.style.background = `linear-gradient(to right, ${PUOR.join(",")})`;
    $("legend-low").textContent = `${DATA.methods[b]} brighter`;
    $("legend-high").textContent = `${DATA.methods[a]} brighter`;
    $("legend-label").textContent = `difference of the colour scale of ${DATA.statistics[name]} (A − B, ±${diffTop.toFixed(2)}); ` +
      "dotted: the two lenses' top-1 differ";
  } else {
    bar.style.background = `linear-gradient(to right, ${VIRIDIS.join(",")})`;
    $("legend-low").textContent = scale.lo; $("legend-high").textContent = scale.hi;
    $("legend-label").textContent = DATA.statistics[name] + (name === "kl" || name === "final_rank" ? " (log scale)" : "");
  }
  if (state.pinned) showDetails(state.pinned);
}

function topTable(caption, p, m, l, t, finalToken) {
  const table = document.createElement("table"), cap = table.createCaption();
  cap.textContent = caption;
  for (let j = 0; j < DATA.k; j++) {
    const s = token(p, m, l, t, j), q = value(p, "topk_p", m, l, t, j), row = table.insertRow();
    if (s === finalToken) row.className = "final";
    const tok = row.insertCell(), pr = row.insertCell(), bar = row.insertCell(), span = document.createElement("span");
    tok.className = "tok"; tok.textContent = shown(s, 16); tok.title = JSON.stringify(s);
    pr.className = "p"; pr.textContent = q >= 0.001 ? (100 * q).toFixed(1) + "%" : q.toExponential(1);
    span.className = "bar"; span.style.width = Math.max(1, Math.round(80 * q)) + "px"; bar.appendChild(span);
  }
  return table;
}

function showDetails(td) {
  const p = state.prompt, l = +td.dataset.layer, t = +td.dataset.position, box = $("details");
  const input = DATA.strings[DATA.prompts[p].tokens[t]], finalToken = DATA.strings[DATA.prompts[p].final[t]];
  box.textContent = "";
  const h = document.createElement("h2");
  h.textContent = `layer ${layerName(l)}, position ${t} (input ${JSON.stringify(input)}; the model's next ${JSON.stringify(finalToken)})`;
  box.appendChild(h);
  const lenses = state.compare >= 0 ? [state.lens, state.compare] : [state.lens];
  for (const m of lenses) {
    if (!valid(p, m, l, t)) { const q = document.createElement("p"); q.textContent = `${lensName(m)}: no map for this layer`; box.appendChild(q); continue; }
    const stats = Object.keys(DATA.statistics).map(name => `${SHORT[name]} ${SCALES[name].fmt(SCALES[name].raw(p, m, l, t))}`);
    const q = document.createElement("p"); q.textContent = `${lensName(m)}: ${stats.join(", ")}`; box.appendChild(q);
    box.appendChild(topTable(`top-${DATA.k}: ${lensName(m)}, layer ${layerName(l)}`, p, m, l, t, finalToken));
  }
  box.appendChild(topTable(`top-${DATA.k}: the model's output (layer out)`, p, 0, DATA.n_layers, t, finalToken));
  document.querySelectorAll("td.cell.selected").forEach(c => c.classList.remove("selected"));
  td.classList.add("selected");
}

function options(select, labels, chosen) {
  select.textContent = "";
  labels.forEach(([value, label]) => { const o = document.createElement("option"); o.value = value; o.textContent = label; select.appendChild(o); });
  select.value = chosen;
}

function moveFocus(td, dl, dt) {
  const l = +td.dataset.layer + dl, t = +td.dataset.position + dt;
  const next = $("grid").querySelector(`td.cell[data-layer="${l}"][data-position="${t}"]`);
  if (!next) return;
  td.tabIndex = -1; next.tabIndex = 0; next.focus();
}

function wire() {
  const grid = $("grid");
  grid.addEventListener("mouseover", e => { const td = e.target.closest("td.cell"); if (td && !state.pinned) showDetails(td); });
  grid.addEventListener("focusin", e => { const td = e.target.closest("td.cell"); if (td && !state.pinned) showDetails(td); });
  grid.addEventListener("click", e => {
    const td = e.target.closest("td.cell");
    if (!td) return;
    if (state.pinned) state.pinned.classList.remove("pinned");
    state.pinned = state.pinned === td ? null : td;
    if (state.pinned) td.classList.add("pinned");
    showDetails(td);
  });
  grid.addEventListener("keydown", e => {
    const td = e.target.closest("td.cell");
    if (!td) return;
    const moves = {ArrowUp: [1, 0], ArrowDown: [-1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
    if (moves[e.key]) { e.preventDefault(); moveFocus(td, ...moves[e.key]); }
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); td.click(); }
  });
  $("prompt").addEventListener("change", e => { state.prompt = +e.target.value; state.pinned = null; buildGrid(); paint(); });
  $("lens").addEventListener("change", e => { state.lens = +e.target.value; paint(); });
  $("compare").addEventListener("change", e => { state.compare = +e.target.value; paint(); });
  $("statistic").addEventListener("change", e => { state.statistic = e.target.value; paint(); });
}

function main() {
  for (const prompt of DATA.prompts) prompts.push(decode(prompt));
  options($("prompt"), DATA.prompts.map((q, i) => [i, `${i + 1}: ` +
    (q.text !== null ? q.text : q.tokens.map(s => DATA.strings[s]).join("")).slice(0, 80)]), 0);
  $("prompt").disabled = DATA.prompts.length < 2;
  const lenses = DATA.methods.map((name, m) => [m, lensName(m)]);
  state.lens = DATA.methods.length - 1;
  options($("lens"), lenses, state.lens);
  options($("compare"), [[-1, "— (one lens)"], ...lenses], -1);
  options($("statistic"), Object.entries(DATA.statistics), state.statistic);
  const meta = DATA.meta || {};
  $("subtitle").textContent = [meta.model && !DATA.title.includes(meta.model) && `model ${meta.model}`,
    `${DATA.n_layers} layers`,
    `${DATA.prompts.length} prompt${DATA.prompts.length > 1 ? "s" : ""}`,
    "rows: layers (out: the model's own output), columns: positions, cells: the lens's top-1 token"]
    .filter(Boolean).join(" · ");
  wire(); buildGrid(); paint();
  $("status").textContent = "Ready.";
  document.body.dataset.ready = "1";
}
try { main(); } catch (err) { $("status").textContent = "Could not show the page's data: " + err; }
"""
