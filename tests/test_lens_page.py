"""The lens's interactive page: its embedded data against the trajectory cell for cell, the page in
a real (headless) Chromium, and the command that writes it (several lenses and prompts, old
folders, refusals)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest

from njtc_solve.evaluation.lens import ShortcutLens, merge_trajectories
from njtc_solve.evaluation.lens_page import read_page_data
from njtc_solve.solve.fit import fit_shortcuts

PROMPTS = ["def add(a, b): return a + b", "The lens reads every layer."]


@pytest.fixture(scope="module")
def maps(tiny_store, tmp_path_factory):
    [jtc] = fit_shortcuts(tiny_store, method="jtc", ranks=None, progress=False)
    [njtc] = fit_shortcuts(tiny_store, method="njtc", ranks=[2], progress=False)
    folder = tmp_path_factory.mktemp("page-maps")
    for sc in (jtc, njtc):
        sc.save(folder / f"{sc.name}.safetensors")
    return {"jtc": jtc, "njtc": njtc, "folder": folder}


@pytest.fixture(scope="module")
def traj(llama, maps):
    """The logit lens, JTC and a rank-2 NJTC on two prompts of different lengths, top-10."""
    model, tokenizer = llama
    parts = [ShortcutLens.from_model(model, maps[m], tokenizer).trajectory(PROMPTS, k=10) for m in ("jtc", "njtc")]
    return merge_trajectories(parts)


def in_process(capsys, *argv) -> subprocess.CompletedProcess:
    """The lens command run in this process as the process would (exit code, one error line)."""
    from njtc_solve.cli import lens, run_cli

    code = run_cli(lens.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


# -- the embedded data ---------------------------------------------------------------------------
def test_the_page_holds_the_trajectory_cell_for_cell(traj):
    data = read_page_data(traj.to_html())
    assert data["methods"] == traj.methods == ["identity", "jtc", "njtc-r2"]
    assert data["n_layers"] == traj.n_layers and data["k"] == 10
    for p, prompt in enumerate(data["prompts"]):
        n = len(traj.token_ids[p])
        assert prompt["tokens"] == traj.decode(traj.token_ids[p])
        assert prompt["final"] == traj.decode(traj.final_top1[p, :n])
        a, ok = prompt["arrays"], traj.valid[:, p, :, :n]
        assert (a["valid"] == ok).all() and ok.all()
        ids = traj.topk_ids[:, p, :, :n]
        assert (a["topk"] == np.array(traj.decode(ids.ravel()), dtype=object).reshape(ids.shape)).all()
        # numbers to 3 significant digits: relative error <= 5e-3
        np.testing.assert_allclose(a["topk_p"], traj.topk_probs[:, p, :, :n], rtol=2.5e-2)
        np.testing.assert_allclose(a["final_prob"], traj.final_prob[:, p, :, :n], rtol=2.5e-2)
        np.testing.assert_allclose(a["entropy"].astype(float), traj.entropy[:, p, :, :n], rtol=2.5e-2)
        np.testing.assert_allclose(a["kl"].astype(float), traj.kl[:, p, :, :n], rtol=2.5e-2)
        assert (a["final_rank"] == traj.final_rank[:, p, :, :n]).all()


def test_final_statistics_agree_with_the_top_k(traj):
    """The lens's probability and rank of the model's top-1 agree with its own top-k where that holds it."""
    ok = traj.valid
    first = traj.topk_ids[..., 0] == traj.final_top1[None, :, None, :]
    assert ((traj.final_rank == 1) == first)[ok].all()
    np.testing.assert_allclose(traj.final_prob[first & ok], traj.topk_probs[..., 0][first & ok], rtol=1e-5)
    at_last_layer = traj.final_rank[:, :, -1][traj.valid[:, :, -1]]
    assert (at_last_layer == 1).all()  # the model's own output ranks its own top-1 first


def test_page_size_and_self_containment(traj):
    page = traj.to_html()
    body = page.split("<body>")[1]
    assert "http://" not in body and "https://" not in body and "src=" not in body
    cells = traj.valid.sum()  # each with its top-10: about 130 bytes (numbers to 3 digits), plus the script
    assert len(page.encode()) < 20_000 + 200 * cells
    html = traj._repr_html_()
    assert html.startswith("<iframe srcdoc=") and "lens-data" in html


# -- in a real browser ---------------------------------------------------------------------------
def _browser_paths() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system (Debian's chromium and chromium-driver), driven by Selenium;
    nothing is downloaded (Selenium Manager is bypassed by naming both paths)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="no browser: selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    paths = _browser_paths()
    if paths is None:
        pytest.skip("no browser: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1366,768"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    yield driver
    driver.quit()


def _cells(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid td.cell')].map(c => [+c.dataset.layer, +c.dataset.position,"
        " c.dataset.token, c.style.background, c.textContent])")


def _select(driver, which, value):
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", which)).select_by_value(str(value))


def test_the_page_in_a_browser(traj, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "lens.html"
    traj.to_html(path)
    browser.get(path.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0  # nothing fetched
    n_rows, n = traj.n_layers + 1, len(traj.token_ids[0])
    # the grid: one cell per layer and position, the selected lens's top-1 (the last lens: njtc-r2)
    cells = _cells(browser)
    assert len(cells) == n_rows * n
    m = len(traj.methods) - 1
    for layer, t, token, _, _ in cells:
        assert token == traj.decode([traj.topk_ids[m, 0, layer, t, 0]])[0]
    # switching the statistic, then the lens, changes what is shown
    _select(browser, "statistic", "kl")
    by_kl = _cells(browser)
    assert [c[3] for c in by_kl] != [c[3] for c in cells]
    _select(browser, "lens", 0)
    logit = _cells(browser)
    assert [c[3] for c in logit] != [c[3] for c in by_kl]
    assert [c[2] for c in logit] == [traj.decode([traj.topk_ids[0, 0, c[0], c[1], 0]])[0] for c in logit]
    # the difference view: lens A minus lens B, on a diverging scale
    _select(browser, "compare", 1)
    assert [c[3] for c in _cells(browser)] != [c[3] for c in logit]
    assert "difference" in browser.find_element("id", "legend-label").text
    _select(browser, "compare", -1)
    # a hover shows the top-10 of the lens and of the model's output
    layer, t = 1, n - 1
    cell = browser.find_element("css selector", f'td.cell[data-layer="{layer}"][data-position="{t}"]')
    ActionChains(browser).move_to_element(cell).perform()
    tables = browser.find_elements("css selector", "#details table")
    assert len(tables) == 2
    rows = [[r.get_attribute("title") for r in tab.find_elements("css selector", "td.tok")] for tab in tables]
    assert rows[0] == [json.dumps(s, ensure_ascii=False) for s in traj.decode(traj.topk_ids[0, 0, layer, t])]
    assert rows[1] == [json.dumps(s, ensure_ascii=False) for s in traj.decode(traj.topk_ids[0, 0, traj.n_layers, t])]
    # keyboard: the arrow keys move the focus through the grid
    cell.click()
    cell.send_keys(Keys.ARROW_UP)
    focused = browser.switch_to.active_element
    assert (focused.get_attribute("data-layer"), focused.get_attribute("data-position")) == (str(layer + 1), str(t))
    # not blank: many colours
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert len(shot.getcolors(1 << 20) or range(1 << 20)) > 50
    # the prompt selector
    _select(browser, "prompt", 1)
    assert len(_cells(browser)) == n_rows * len(traj.token_ids[1])
    # in a notebook: the page inline, in an iframe
    notebook = tmp_path / "notebook.html"
    notebook.write_text(f"<html><body>{traj._repr_html_()}</body></html>", encoding="utf-8")
    browser.get(notebook.as_uri())
    browser.switch_to.frame(browser.find_element("tag name", "iframe"))
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert len(_cells(browser)) == n_rows * n
    browser.switch_to.default_content()


# -- the command ---------------------------------------------------------------------------------
def test_cli_reads_every_lens_and_prompt_into_one_page(tiny_models, maps, tmp_path, capsys):
    from njtc_solve.maps.tuned_lens import export_tuned_lens

    tuned = export_tuned_lens(maps["njtc"], tmp_path / "tuned")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n  \n{PROMPTS[1]}\n", encoding="utf-8")
    out = tmp_path / "lens"
    done = in_process(capsys, "--model", tiny_models["llama"], "--shortcuts", maps["folder"] / "jtc.safetensors",
                      "--shortcuts", maps["folder"] / "njtc-r2.safetensors", "--tuned-lens", tuned,
                      "--prompt-file", prompts, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "prompt 2: " in done.stdout
    data = read_page_data((out / "lens.html").read_text(encoding="utf-8"))
    assert data["methods"] == ["identity", "jtc", "njtc-r2", "tuned-lens"]
    assert [p["text"] for p in data["prompts"]] == PROMPTS
    # the page agrees with trajectory.json, cell for cell
    records = json.loads((out / "trajectory.json").read_text())["records"]
    assert len(records) == sum(a["valid"].sum() for a in (p["arrays"] for p in data["prompts"]))
    for r in records:
        a = data["prompts"][r["prompt"]]["arrays"]
        m, layer, t = data["methods"].index(r["method"]), r["layer"], r["position"]
        assert list(a["topk"][m, layer, t]) == r["topk_tokens"] and a["final_rank"][m, layer, t] == r["final_rank"]
        np.testing.assert_allclose(a["topk_p"][m, layer, t], r["topk_probs"], rtol=2.5e-2)
    # two files of one name: both read, named apart by their files; one file twice: refused
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(maps["folder"] / "jtc.safetensors", other / "jtc-copy.safetensors")
    again = in_process(capsys, "--model", tiny_models["llama"], "--shortcuts", maps["folder"] / "jtc.safetensors",
                       "--shortcuts", other / "jtc-copy.safetensors", "--prompt", "x", "--out", out)
    assert again.returncode == 0, again.stderr
    names = read_page_data((out / "lens.html").read_text(encoding="utf-8"))["methods"]
    assert names == ["identity", "jtc (jtc.safetensors)", "jtc (jtc-copy.safetensors)"]
    twice = in_process(capsys, "--model", tiny_models["llama"], "--shortcuts", maps["folder"] / "jtc.safetensors",
                       "--shortcuts", maps["folder"] / "jtc.safetensors", "--prompt", "x")
    assert twice.returncode == 2 and twice.stderr == f"error: --shortcuts {maps['folder'] / 'jtc.safetensors'} is given twice\n"


def test_cli_updates_an_old_lens_folder_and_keeps_out_of_foreign_ones(tiny_models, tmp_path, capsys):
    # a folder as the version before the page wrote it: figure, JSON (the marker) and CSV, no lens.html
    old = tmp_path / "old"
    old.mkdir()
    record = {"method": "identity", "prompt": 0, "layer": 0, "position": 0, "input_token": "x", "top1_token": "y",
              "top1_prob": 0.5, "entropy": 1.0, "kl": 0.1, "agrees": False, "final_token": "z",
              "topk_tokens": ["y"], "topk_probs": [0.5]}
    (old / "trajectory.json").write_text(json.dumps({"meta": {"prompt": "x"}, "records": [record]}))
    (old / "trajectory.csv").write_text("method\nidentity\n")
    (old / "trajectory.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    done = in_process(capsys, "--model", tiny_models["llama"], "--prompt", "import os", "--out", old)
    assert done.returncode == 0, done.stderr
    assert read_page_data((old / "lens.html").read_text(encoding="utf-8"))["methods"] == ["identity"]
    # a lens.html this project did not write is never replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "lens.html").write_text("mine")
    done = in_process(capsys, "--model", tiny_models["llama"], "--prompt", "import os", "--out", foreign)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: --out {foreign} holds lens.html, which this project did not write and never replaces; move it away or choose another --out")
    assert (foreign / "lens.html").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["lens.html"]


def test_cli_refuses_an_empty_prompt_file_and_a_prompt_past_the_context_before_the_model_loads(
        tiny_models, tmp_path, capsys):
    # a model folder without its weights: loading it would fail, so a refusal here comes before the load
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_models["llama"], folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    done = in_process(capsys, "--model", folder, "--prompt-file", empty)
    assert done.returncode == 2 and done.stderr == f"error: --prompt-file {empty} holds no prompt (one per line)\n"
    limit = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    done = in_process(capsys, "--model", folder, "--prompt", "word " * limit)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: --prompt has ") and done.stderr.endswith(f"tokens; the model reads at most {limit}\n")
    many = tmp_path / "many.txt"
    many.write_text("short\n" + "word " * limit + "\n", encoding="utf-8")
    done = in_process(capsys, "--model", folder, "--prompt-file", many)
    assert done.returncode == 2 and done.stderr.startswith(f"error: prompt 2 of --prompt-file {many} has ")
    # a prompt that fits gets past the checks, to the load that fails
    done = in_process(capsys, "--model", folder, "--prompt", "word")
    assert done.returncode == 2 and "cannot load model" in done.stderr


def test_a_lens_without_a_map_for_every_layer(llama, maps, browser, tmp_path):
    model, tokenizer = llama
    jtc = maps["jtc"]
    partial = ShortcutLens.from_model(model, jtc.replace(maps={1: jtc.maps[1]}), tokenizer).trajectory(PROMPTS[:1], k=3)
    path = tmp_path / "partial.html"
    a = read_page_data(partial.to_html(path))["prompts"][0]["arrays"]
    assert (a["valid"] == partial.valid[:, 0]).all() and a["valid"][1].sum() == 2 * len(partial.token_ids[0])
    assert np.isnan(a["kl"][1, 0]).all() and (a["topk"][1, 0] == None).all()  # noqa: E711 (an object array)
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(path.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    hatched = browser.execute_script(  # no map: an empty, hatched cell
        "return [...document.querySelectorAll('#grid td.cell.invalid')].map(c => [+c.dataset.layer, c.dataset.token])")
    no_map = [layer for layer in range(partial.n_layers) if layer != 1]  # the tiny Llama: layers 0 and 2
    assert sorted(hatched) == [[layer, ""] for layer in no_map for _ in partial.token_ids[0]]


def test_token_texts_that_look_like_markup_stay_text(traj):
    import dataclasses

    class Markup:  # a tokenizer whose tokens are markup
        vocab_size = 300

        def decode(self, ids):
            return f"</script><b id='{ids[0]}'>&amp;"

    page = dataclasses.replace(traj, tokenizer=Markup()).to_html()
    assert page.count("</script>") == 2  # the data's and the code's own
    data = read_page_data(page)
    assert data["prompts"][0]["tokens"][0] == Markup().decode([traj.token_ids[0][0]])
