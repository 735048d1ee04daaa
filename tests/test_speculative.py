"""Self-speculative decoding with a shortcut draft: the output is the model's greedy output, token for token."""

from __future__ import annotations

import pytest
import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.models import model_sha256
from njtc_solve.infer.speculative import ShortcutDrafter, speculative_generate
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

VOCAB, WIDTH, BLOCKS = 120, 32, 4
FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox")


def tiny_model(family: str, blocks: int = BLOCKS, seed: int = 0):
    """A tiny random causal LM of ``family`` (4 blocks, width 32), in evaluation mode."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=blocks,
                  num_attention_heads=4, max_position_embeddings=128)
    config = {
        "llama": lambda: T.LlamaConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=WIDTH, n_layer=blocks, n_head=4,
                                     bos_token_id=None, eos_token_id=None),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
    }[family]()
    config.eos_token_id = config.bos_token_id = None
    config.pad_token_id = None
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init: logits far from ties, varied tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def random_maps(model, layers, rank: int | None = None, seed: int = 1) -> Shortcuts:
    """Maps recorded as fitted on ``model`` (its weights hash and head), with random tensors."""
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for layer in layers:
        bias = torch.randn(WIDTH, generator=g)
        if rank is None:
            maps[layer] = ShortcutMap(weight=torch.eye(WIDTH) + 0.3 * torch.randn(WIDTH, WIDTH, generator=g), bias=bias)
        else:
            maps[layer] = ShortcutMap(U=torch.randn(WIDTH, rank, generator=g), V=torch.randn(rank, WIDTH, generator=g),
                                      bias=bias)
    return Shortcuts("jtc" if rank is None else "njtc", maps, BLOCKS, rank=rank, model_sha256=model_sha256(model),
                     head_sha256=Head.from_model(model).fingerprint())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (the machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ([5, 17, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [99])


def reference(model, prompt, n):
    ids = torch.tensor([prompt])
    return model.generate(ids, do_sample=False, max_new_tokens=n)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("map_kind", ["identity", "jtc", "njtc"])
def test_output_is_the_models_greedy_output(family, map_kind):
    name, model = family
    shortcuts = None if map_kind == "identity" else random_maps(model, range(1, BLOCKS),
                                                                rank=4 if map_kind == "njtc" else None)
    for exit_layer in (1, BLOCKS - 1):
        drafter = ShortcutDrafter(model, shortcuts, exit_layer)
        for prompt in PROMPTS:
            expected = reference(model, prompt, 12)
            for k in (1, 4):
                result = speculative_generate(model, torch.tensor([prompt]), drafter=drafter, max_new_tokens=12,
                                              draft_tokens=k)
                assert result.sequences.tolist() == expected.tolist(), (name, map_kind, exit_layer, prompt, k)
                assert result.stats.new_tokens == 12


def _cache_matches_a_full_pass(model, result):
    """Every layer's cache holds the whole sequence but its last token, as one forward pass computes it."""
    seq = result.sequences
    full = model(input_ids=seq[:, :-1], use_cache=True)
    reference_cache = getattr(full, "past_key_values", None) or getattr(full, "cache", None)
    for mine, theirs in zip(result.cache.layers, reference_cache.layers):
        assert mine.keys.shape[-2] == seq.shape[1] - 1
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_draft_rejected(name):
    """A map that always drafts a token the model never writes: nothing is accepted, the output is unchanged."""
    model = tiny_model(name)
    prompt = PROMPTS[0]
    expected = reference(model, prompt, 10)
    never = next(t for t in range(VOCAB) if t not in expected[0].tolist())
    head = Head.from_model(model)
    # a zero map with a bias whose normalised logits put `never` first
    direction = head.unembed[never] - head.unembed.mean(0)
    shortcuts = Shortcuts("jtc", {2: ShortcutMap(weight=torch.zeros(WIDTH, WIDTH), bias=100 * direction)}, BLOCKS,
                          model_sha256=model_sha256(model), head_sha256=head.fingerprint())
    drafter = ShortcutDrafter(model, shortcuts, 2)
    assert int(drafter.draft_logits(torch.randn(1, WIDTH)).argmax()) == never
    result = speculative_generate(model, torch.tensor([prompt]), drafter=drafter, max_new_tokens=10, draft_tokens=4)
    assert result.sequences.tolist() == expected.tolist()
    assert result.stats.accepted == 0 and result.stats.drafted > 0
    assert result.stats.verifications == 9  # one token per verification, after the prefill's
    _cache_matches_a_full_pass(model, result)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_draft_accepted_when_the_last_block_does_nothing(name):
    """With the last block's writes zeroed, layer L−1 is the last layer: the logit lens at L−1 is the model."""
    model = tiny_model(name)
    last = model.base_model.layers[-1] if hasattr(model.base_model, "layers") else model.base_model.h[-1]
    with torch.no_grad():
        for module in last.modules():  # the projections that write into the residual stream
            if isinstance(module, torch.nn.Linear) and module.out_features == WIDTH:
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        for module in last.modules():  # GPT-2's Conv1D
            if type(module).__name__ == "Conv1D" and module.weight.shape[1] == WIDTH:
                module.weight.zero_()
                module.bias.zero_()
    drafter = ShortcutDrafter(model, None, BLOCKS - 1)
    for prompt in PROMPTS:
        expected = reference(model, prompt, 13)
        result = speculative_generate(model, torch.tensor([prompt]), drafter=drafter, max_new_tokens=13,
                                      draft_tokens=4)
        assert result.sequences.tolist() == expected.tolist()
        assert result.stats.acceptance_rate == 1.0
        assert result.stats.verifications == 3  # 1 + 3 × (4 drafts + the model's own)
        _cache_matches_a_full_pass(model, result)


def test_cache_after_partial_acceptance():
    model = tiny_model("gpt2")
    result = speculative_generate(model, torch.tensor([PROMPTS[1]]), drafter=ShortcutDrafter(model, None, 1),
                                  max_new_tokens=15, draft_tokens=3)
    assert 0 < result.stats.accepted < result.stats.drafted
    _cache_matches_a_full_pass(model, result)


@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_sequence_stops_as_generate_does(name):
    model = tiny_model(name)
    plain = reference(model, PROMPTS[1], 12)[0, len(PROMPTS[1]):].tolist()
    model.generation_config.eos_token_id = plain[6]
    expected = reference(model, PROMPTS[1], 12)
    assert expected.shape[1] < len(PROMPTS[1]) + 12
    for k in (1, 4):
        result = speculative_generate(model, torch.tensor([PROMPTS[1]]), drafter=ShortcutDrafter(model, None, 2),
                                      max_new_tokens=12, draft_tokens=k)
        assert result.sequences.tolist() == expected.tolist()


def test_one_token_and_no_drafts():
    model = tiny_model("llama")
    drafter = ShortcutDrafter(model, None, 1)
    for n, k in ((1, 3), (5, 0)):
        result = speculative_generate(model, torch.tensor([PROMPTS[0]]), drafter=drafter, max_new_tokens=n,
                                      draft_tokens=k)
        assert result.sequences.tolist() == reference(model, PROMPTS[0], n).tolist()
        assert result.stats.drafted == 0


def test_no_drafts_is_the_models_own_generate():
    """k = 0 hands the whole decoding to ``model.generate`` (never slower than plain greedy)."""
    model = tiny_model("llama")
    calls = []
    own = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return own(*args, **kwargs)

    model.generate = counted
    result = speculative_generate(model, torch.tensor([PROMPTS[1]]), drafter=ShortcutDrafter(model, None, 1),
                                  max_new_tokens=7, draft_tokens=0)
    del model.generate
    assert len(calls) == 1 and calls[0]["do_sample"] is False
    assert result.sequences.tolist() == reference(model, PROMPTS[1], 7).tolist()
    s = result.stats
    assert (s.new_tokens, s.verifications, s.drafted, s.accepted) == (7, 6, 0, 0)


def test_low_rank_draft_head_matches_the_maps_logits():
    model = tiny_model("llama")
    shortcuts = random_maps(model, [2], rank=3).attach_head(model)
    drafter = ShortcutDrafter(model, shortcuts, 2)
    assert drafter.low_rank is not None
    h = torch.randn(7, WIDTH)
    torch.testing.assert_close(drafter.draft_logits(h), shortcuts(h, 2), rtol=1e-4, atol=1e-4)
    full = random_maps(model, [2]).attach_head(model)
    torch.testing.assert_close(ShortcutDrafter(model, full, 2).draft_logits(h), full(h, 2), rtol=1e-4, atol=1e-4)


def test_the_drafter_refuses_what_does_not_belong():
    model = tiny_model("llama")
    for bad in (0, BLOCKS, -1, 1.5, True):
        with pytest.raises(NJTCError, match="`exit_layer` must be a layer in 1..3"):
            ShortcutDrafter(model, None, bad)
    maps = random_maps(model, [1, 2])
    with pytest.raises(NJTCError, match="no map for `exit_layer` 3"):
        ShortcutDrafter(model, maps, 3)
    with pytest.raises(NJTCError, match="another model"):
        ShortcutDrafter(model, maps.replace(model_sha256="0" * 64), 1)
    with pytest.raises(NJTCError, match="target layer 3"):
        ShortcutDrafter(model, maps.replace(target_layer=3, maps={1: maps.maps[1]}), 1)
    other = tiny_model("llama", seed=5)
    with pytest.raises(NJTCError, match="another model than"):
        speculative_generate(other, torch.tensor([PROMPTS[0]]), drafter=ShortcutDrafter(model, None, 1),
                             max_new_tokens=3, draft_tokens=1)
    drafter = ShortcutDrafter(model, None, 1)
    for n in (0, -1):
        with pytest.raises(NJTCError, match="`max_new_tokens` must be at least 1"):
            speculative_generate(model, torch.tensor([PROMPTS[0]]), drafter=drafter, max_new_tokens=n, draft_tokens=1)
    with pytest.raises(NJTCError, match="`draft_tokens`"):
        speculative_generate(model, torch.tensor([PROMPTS[0]]), drafter=drafter, max_new_tokens=2, draft_tokens=-1)
    padded = [5, 0, 17, 0, 42, 8]  # pad id 0 (not eos): generate masks those positions out
    with pytest.raises(NJTCError, match="`input_ids` holds the pad token id 0"):
        speculative_generate(model, torch.tensor([padded]), drafter=drafter, max_new_tokens=2, draft_tokens=1)
    model.generation_config.suppress_tokens = []  # an empty list suppresses nothing
    speculative_generate(model, torch.tensor([PROMPTS[0]]), drafter=drafter, max_new_tokens=2, draft_tokens=1)
    for name, value in (("num_beams", 3), ("num_beam_groups", 2), ("penalty_alpha", 0.6), ("repetition_penalty", 1.3),
                        ("dola_layers", "low"), ("custom_generate", "a/repo"), ("max_time", 1.0),
                        ("encoder_repetition_penalty", 3.0)):
        setattr(model.generation_config, name, value)  # another strategy or stopping rule, a processor: not the argmax
        with pytest.raises(NJTCError, match=name):
            speculative_generate(model, torch.tensor([PROMPTS[0]]), drafter=drafter, max_new_tokens=2, draft_tokens=1)
        setattr(model.generation_config, name, None)


# -- the command --------------------------------------------------------------------------------
from conftest import run_module, sharpened_model  # noqa: E402

from njtc_solve.cli.generate import run as run_generate  # noqa: E402


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """A model folder with a configuration of 4 blocks and no weights: loading it fails."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("config_only")
    LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


def _refused(capsys, *argv) -> str:
    code = run_generate(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "cannot load model" not in err  # refused before the model loads
    return err


def _maps_file(tmp_path, target: int, layers=(1, 2), width: int = WIDTH, name="maps.safetensors") -> str:
    maps = {l: ShortcutMap(weight=torch.eye(width), bias=torch.zeros(width)) for l in layers}
    path = tmp_path / name
    Shortcuts("jtc", maps, target, model_sha256="f" * 64).save(path)
    return str(path)


def test_command_refuses_bad_input_before_the_model_loads(config_only, tmp_path, capsys):
    model = ["--model", str(config_only), "--prompt", "hello"]
    for layer in ("0", "4", "-1"):
        assert "--exit-layer must be in 1..3" in _refused(capsys, *model, "--exit-layer", layer)
    assert "--max-new-tokens must be at least 1" in _refused(capsys, *model, "--exit-layer", "1",
                                                              "--max-new-tokens", "0")
    assert "--draft-tokens must be auto or a whole number" in _refused(capsys, *model, "--exit-layer", "1",
                                                                       "--draft-tokens", "many")
    assert "--draft-tokens must be 0 or more" in _refused(capsys, *model, "--exit-layer", "1", "--draft-tokens", "-2")
    err = _refused(capsys, *model, "--exit-layer", "1", "--shortcuts", _maps_file(tmp_path, target=3))
    assert "map to layer 3, not the model's last layer (4)" in err
    err = _refused(capsys, *model, "--exit-layer", "3", "--shortcuts", _maps_file(tmp_path, target=4))
    assert "no map for --exit-layer 3" in err
    err = _refused(capsys, *model, "--exit-layer", "1", "--shortcuts", _maps_file(tmp_path, 4, width=16, name="w.st"))
    assert "another model" in err
    assert "--prompt is empty" in _refused(capsys, "--model", str(config_only), "--prompt", " ", "--exit-layer", "1")
    assert "not found" in _refused(capsys, "--model", str(tmp_path / "none.gguf"), "--prompt", "a", "--exit-layer", "1")


def test_command_refuses_another_models_maps_and_generates(tiny_models, tmp_path, capsys):
    folder = str(tiny_models["llama"])  # 3 blocks
    maps = _maps_file(tmp_path, target=3)
    code = run_generate(["--model", folder, "--prompt", "hello", "--exit-layer", "1", "--shortcuts", maps,
                         "--max-new-tokens", "6", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "were fitted on another model" in err and len(err.strip().splitlines()) == 1
    proc = run_module("njtc_solve.generate", "--model", folder, "--prompt", "The", "--exit-layer", "2",
                      "--max-new-tokens", "6", "--draft-tokens", "auto", "--max-draft-tokens", "3",
                      "--calibration-sequences", "1")
    assert proc.returncode == 0, proc.stderr
    assert "--draft-tokens auto:" in proc.stdout and "tokens per verification" in proc.stdout
    assert "nan" not in proc.stdout.lower()  # auto may choose not to draft (then: the model's own decoding)


def test_command_without_drafts_prints_no_nan(tiny_models, capsys):
    folder = str(tiny_models["llama"])
    for k in ("0", "2"):
        assert run_generate(["--model", folder, "--prompt", "The", "--exit-layer", "1", "--max-new-tokens", "4",
                             "--draft-tokens", k, "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "nan" not in out.lower(), out
        assert ("the model's own greedy decoding" in out) == (k == "0"), out
    assert run_generate(["--model", folder, "--prompt", "The", "--max-new-tokens", "4", "--draft-tokens", "0",
                         "--no-progress"]) == 0  # no draft: no --exit-layer needed
    assert "the model's own greedy decoding" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # a draft needs one, as argparse says
        run_generate(["--model", folder, "--prompt", "The", "--draft-tokens", "2"])
    assert stop.value.code == 2 and "required: --exit-layer" in capsys.readouterr().err


# -- calibration --------------------------------------------------------------------------------
def test_expected_tokens_and_the_choice_from_costs():
    from njtc_solve.infer.calibrate import CalibrationTable, expected_tokens

    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 2) == 3.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    costs = {"plain": 1.0, "lower": {1: 0.1, 3: 0.75}, "upper": {1: {m: 0.9 for m in range(1, 5)},
                                                              3: {m: 0.25 for m in range(1, 5)}},
             "map": {"good": 0.05, "bad": 0.05}}
    table = CalibrationTable.from_measurements({"good": {1: 0.9, 3: 0.9}, "bad": {1: 0.0, 3: 0.0}}, costs, 3)
    by = {(r["map"], r["exit_layer"]): r for r in table.rows}
    assert by[("bad", 1)]["draft_tokens"] == 0 and by[("bad", 3)]["draft_tokens"] == 0  # drafting never pays
    assert by[("good", 1)]["draft_tokens"] == 3 and table.best is by[("good", 1)]
    step = 4 * 0.1 + 3 * 0.05 + 0.9
    assert abs(by[("good", 1)]["tokens_per_second"] - expected_tokens(0.9, 3) / step) < 1e-12
    assert "*" in table.format().splitlines()[2 + table.rows.index(table.best)]


def test_calibrate_measures_the_lens_agreement():
    from njtc_solve.data.capture import capture_residual_stream
    from njtc_solve.infer.calibrate import calibrate

    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, VOCAB, (1, 24), generator=g) for _ in range(2)]
    table = calibrate(model, sequences, {"identity": None, "jtc": random_maps(model, [1, 2])}, [1, 2, 3],
                      max_draft_tokens=2, repeats=1)
    assert sorted(table.acceptance["jtc"]) == [1, 2] and sorted(table.acceptance["identity"]) == [1, 2, 3]
    assert len(table.rows) == 5 and table.best in table.rows
    head = Head.from_model(model)
    hits = 0
    with capture_residual_stream(model) as hidden, torch.no_grad():
        for s in sequences:
            own = model(input_ids=s).logits[0, 8:].argmax(-1)
            hits += int((head.logits(hidden[2][0, 8:]).argmax(-1) == own).sum())
    assert abs(table.acceptance["identity"][2] - hits / 32) < 1e-9
    assert set(table.costs["upper"][2]) == {1, 2, 3}


# -- every family of the table --------------------------------------------------------------------
SLIDING = ("mistral", "gemma2", "gemma3_text", "gemma3")  # their dynamic caches hold sliding-window layers


def _family_model(family: str):
    from test_families import FAMILIES as ALL, _config

    assert family in ALL
    config = _config(family, VOCAB, torch.rand(2, generator=torch.Generator().manual_seed(0)))
    for c in (config, getattr(config, "text_config", None)):
        if c is not None:
            c.eos_token_id = c.bos_token_id = c.pad_token_id = None
    model = sharpened_model(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


@pytest.mark.parametrize("family", [f for f in __import__("test_families").FAMILIES if f not in SLIDING])
def test_identity_on_every_family_of_the_table(family):
    model = _family_model(family)  # 2 blocks: exit layer 1
    ids = torch.tensor([[5, 17, 42, 8, 9, 11]])
    expected = model.generate(ids, do_sample=False, max_new_tokens=10)
    for k in (1, 3):
        result = speculative_generate(model, ids, drafter=ShortcutDrafter(model, None, 1), max_new_tokens=10,
                                      draft_tokens=k)
        assert result.sequences.tolist() == expected.tolist(), (family, k)


@pytest.mark.parametrize("family", SLIDING[:2])
def test_sliding_window_caches_are_refused(family):
    model = _family_model(family)
    with pytest.raises(NJTCError, match="sliding-window"):
        speculative_generate(model, torch.tensor([[5, 17, 42]]), drafter=ShortcutDrafter(model, None, 1),
                             max_new_tokens=4, draft_tokens=2)


def test_ids_that_are_not_token_ids_are_one_line():
    model = tiny_model("llama")
    drafter = ShortcutDrafter(model, None, 1)
    vocab = model.get_input_embeddings().num_embeddings
    for bad in (torch.tensor([[5.0, 17.0]]), torch.tensor([[5, vocab]]), torch.tensor([[-1, 5]])):
        with pytest.raises(NJTCError, match="`input_ids` must be token ids"):
            speculative_generate(model, bad, drafter=drafter, max_new_tokens=2, draft_tokens=1)
