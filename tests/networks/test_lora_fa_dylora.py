"""networks.lora_fa (frozen down projections) and networks.dylora (rank blocks trained one per
step; the full-rank file and the fixed-rank files cut from it)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.utils.errors import UserError
from networks import dylora, lora, lora_fa
from networks.base import NetworkAdapter
from networks.extract_lora_from_dylora import extract
from tests.conftest import kohya_hashes


def _step(net, tiny, lr=0.1):
    """One SGD step on a random target through the hooked text encoder and UNet."""
    adapter = NetworkAdapter(net)
    adapter.prepare_grad_etc(tiny.text_encoder, tiny.unet)
    groups, _ = adapter.optimizer_groups(None, None, lr)
    optimizer = torch.optim.SGD(groups, lr=lr)
    adapter.on_epoch_start(tiny.text_encoder, tiny.unet)
    adapter.on_step_start(tiny.text_encoder, tiny.unet)
    ids = torch.randint(0, 50, (1, 77))
    hidden = tiny.text_encoder(ids).last_hidden_state
    pred = tiny.unet(torch.randn(1, 4, 8, 8), torch.tensor([300]), hidden).sample
    (pred - torch.randn_like(pred)).pow(2).mean().backward()
    optimizer.step()
    return groups


def test_lora_fa_trains_only_the_up_projections(tiny_sd1):
    torch.manual_seed(0)
    net = lora_fa.create_network(1.0, 4, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    groups = _step(net, tiny_sd1)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in net.get_trainable_params()}
    assert all(id(m.lora_down.weight) not in grouped and not m.lora_down.weight.requires_grad for m in net.all_loras())
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "lora_down" in k)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_up" in k)
    assert set(after) == set(lora.create_network(1.0, 4, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet).state_dict())


def test_dylora_uses_the_drawn_block_and_holds_the_ones_before_it(tiny_sd1):
    torch.manual_seed(0)
    net = dylora.create_network(1.0, 8, 8, None, tiny_sd1.text_encoder, tiny_sd1.unet, unit="2")
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    module = next(m for m in net.unet_loras if not m.conv)
    for i in range(module.blocks):
        torch.nn.init.normal_(getattr(module, f"lora_up_{i}"), std=0.1)
    x = torch.randn(3, module._org[0].in_features)
    module.train()
    module.trained_block = 1  # ranks 0-3 used, block 1 trained, block 0 held
    out = module(x) - module._org_forward(x)
    down, up = module._weights(2, None)
    torch.testing.assert_close(out, (x @ down.T @ up.T) * (8 / 4))
    out.sum().backward()
    assert module.lora_down_0.grad is None and module.lora_up_0.grad is None
    assert module.lora_down_1.grad is not None and module.lora_up_2.grad is None
    module.eval()  # outside training: every rank, scale alpha / dim
    down, up = module._weights(4, None)
    torch.testing.assert_close(module(x) - module._org_forward(x), (x @ down.T @ up.T) * (8 / 8))


def test_dylora_trains_every_block_and_saves_kohyas_full_rank_file(tiny_sd1, tmp_path):
    torch.manual_seed(1)
    net = dylora.create_network(1.0, 4, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet, unit="1", conv_dim="2")
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    drawn = set()
    for _ in range(12):
        _step(net, tiny_sd1)
        drawn.add(net.unet_loras[0].trained_block)
    assert drawn == {0, 1, 2, 3}
    file = tmp_path / "dylora.safetensors"
    net.save_weights(str(file), None, {"ss_network_module": "networks.dylora"})
    state = load_file(str(file))
    ups = {k: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert all(v.shape[1] == (2 if k.endswith(("conv1.lora_up.weight", "conv2.lora_up.weight")) else 4)
               for k, v in ups.items() if "resnets" in k)
    assert all((v.abs().sum(dim=tuple(d for d in range(v.ndim) if d != 1)) > 0).all() for v in ups.values())
    # it loads as a plain LoRA, and its full-rank update is the DyLoRA network's
    plain, _ = dylora.create_network_from_weights(1.0, str(file), None, tiny_sd1.text_encoder, tiny_sd1.unet,
                                                  for_inference=True)
    plain.load_weights(str(file))
    by_name = {m.lora_name: m for m in plain.all_loras()}
    for m in net.all_loras():
        torch.testing.assert_close(by_name[m.lora_name].delta_weight(), m.delta_weight())
    again = dylora.create_network(1.0, 4, 4, None, tiny_sd1.text_encoder, tiny_sd1.unet, unit="1", conv_dim="2")
    again.load_weights(str(file))  # --network_weights into a DyLoRA network
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def test_extracted_ranks_are_the_leading_sub_matrices(tiny_sd1, tmp_path):
    net = dylora.create_network(1.0, 6, 3, None, tiny_sd1.text_encoder, tiny_sd1.unet, unit="2")
    torch.manual_seed(3)
    for m in net.all_loras():
        for i in range(m.blocks):
            torch.nn.init.normal_(getattr(m, f"lora_up_{i}"))
    full = tmp_path / "dy.safetensors"
    net.save_weights(str(full), None, {"ss_network_dim": "6", "ss_training_comment": "hi"})
    written = extract(str(full), str(tmp_path / "cut.safetensors"), 2)
    assert [p.name for p in written] == ["cut-0002.safetensors", "cut-0004.safetensors"]
    source = load_file(str(full))
    from safetensors import safe_open
    for path, rank in zip(written, (2, 4)):
        part = load_file(str(path))
        for key, value in source.items():
            expected = value[:rank] if "lora_down" in key else (value[:, :rank] if "lora_up" in key else value)
            assert torch.equal(part[key], expected), key
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_network_dim"] == str(rank) and "rank 6" in meta["ss_training_comment"]
        # this file's hashes, not the source's
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(part, meta)


def test_dylora_bad_input(tiny_sd1):
    with pytest.raises(UserError, match="must be multiples of unit=3"):
        dylora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, unit="3")
    with pytest.raises(UserError, match="unknown key"):
        dylora.check_network_args({"block_dims": "1"}, "sd")
    with pytest.raises(UserError, match="--dim_from_weights: networks.dylora"):
        dylora.create_network_from_weights(1.0, "x.safetensors", None, tiny_sd1.text_encoder, tiny_sd1.unet)
