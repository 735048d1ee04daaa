"""The model's room (core/decoder.py): hooks and pass-through leave the model as it was, exceptions included."""

from __future__ import annotations

import pytest
import torch

from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head


def tiny_llama(blocks: int = 3):
    import transformers as T

    config = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=blocks,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


IDS = torch.tensor([[3, 9, 27, 5, 11]])


def untouched(model) -> bool:
    """No hook on any module and no instance-level forward."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())


def test_hooks_and_pass_through_are_undone_on_an_exception():
    model = tiny_llama()
    decoder = Decoder.of(model)
    with torch.no_grad():
        before = model(input_ids=IDS).logits

    def fail(*args):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with decoder.hooks({"block_in.0": lambda *a: None, "block_out.1": fail, "mlp_out.2": lambda *a: None}):
            model(input_ids=IDS)
    assert untouched(model)
    with pytest.raises(RuntimeError, match="inside the pass"):
        with decoder.passed_through([1, 2], last_output=torch.zeros(1, 5, 16)):
            assert "forward" in decoder.blocks[1].__dict__
            raise RuntimeError("inside the pass")
    with pytest.raises(NJTCError, match="no hook point"):
        with decoder.hooks({"block_out.0": lambda *a: None, "block_out.3": lambda *a: None}):
            pass
    assert untouched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)


def test_pass_through_and_replay_reproduce_the_model():
    model = tiny_llama()
    decoder = Decoder.of(model)
    recorded = decoder.record(IDS)
    assert len(recorded.hidden) == 4 and len(recorded.calls) == 3
    assert torch.equal(decoder.run_blocks(recorded, recorded.hidden[0], 0, 3), recorded.hidden[3])
    for first in (1, 2, 3):  # the stream a block writes, then the model's own forward from there
        torch.testing.assert_close(decoder.run_from(IDS, recorded.hidden[first], first_block=first),
                                   recorded.logits, rtol=1e-5, atol=1e-5)
    stream = recorded.hidden[2].clone().requires_grad_(True)
    decoder.run_from(IDS, stream, first_block=2, grad=True).sum().backward()
    assert stream.grad is not None and stream.grad.abs().sum() > 0
    assert untouched(model)


def test_the_decoder_is_kept_and_follows_the_model():
    model = tiny_llama()
    decoder = Decoder.of(model)
    assert Decoder.of(model) is decoder
    head = decoder.head
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # an in-place change: the head is read again
    assert torch.equal(decoder.head.unembed, Head.from_model(model).unembed)
    assert not torch.equal(decoder.head.unembed, head.unembed)
    copy = decoder.head
    copy.norm_weight = copy.norm_weight * 3  # a caller's copy: the decoder's head is not changed
    assert torch.equal(decoder.head.norm_weight, Head.from_model(model).norm_weight)
    decoder.remove_blocks(1, 1)
    assert decoder.n_blocks == 2 == model.config.num_hidden_layers
    assert Decoder.of(model) is decoder and len(model.model.layers) == 2
