"""Every trainable parameter of a network lands in exactly one optimizer group, whatever the family
and however the learning rates are given (the flags go through the real parser and config builder).

Regression: on SD1/SD2 a two-value ``--text_encoder_lr`` (which the kohya_ss GUI always writes) used
to leave every text-encoder module out of the optimizer, because the groups were looked up by SDXL's
``lora_te1_``/``lora_te2_`` prefixes.
"""

from __future__ import annotations

import pytest

from library.args.common import network_training_parser
from library.config.training_config import text_encoder_rates
from library.models.tiny import make_tiny_sd1, make_tiny_sd2, make_tiny_sd3, make_tiny_sdxl
from networks import lora, lora_sd3
from networks.base import NetworkAdapter
from sdxl_train_network import add_sdxl_args

LR, TE1, TE2, TE3 = 1e-3, 1e-5, 2e-5, 3e-5


def _models(family: str):
    if family == "sd1":
        parts = make_tiny_sd1(seed=0)
        return lora, [parts.text_encoder], parts.unet
    if family == "sd2":
        parts = make_tiny_sd2(seed=0)
        return lora, [parts.text_encoder], parts.unet
    if family == "sdxl":
        parts = make_tiny_sdxl(seed=0)
        return lora, [parts.text_encoder_1, parts.text_encoder_2], parts.unet
    parts = make_tiny_sd3(seed=0)
    return lora_sd3, [parts.clip_l, parts.clip_g, parts.t5xxl], parts.transformer


RATE_FLAGS = {
    "one": ["--text_encoder_lr", str(TE1)],
    "two": ["--text_encoder_lr", str(TE1), str(TE2)],
    "three": ["--text_encoder_lr", str(TE1), str(TE2), str(TE3)],
    "per_encoder": ["--text_encoder_lr1", str(TE1), "--text_encoder_lr2", str(TE2)],
    "none": [],
}
NETWORK_ARGS = {
    "plain": {},
    "loraplus": {"loraplus_lr_ratio": "4"},
    "block_lr": {"down_lr_weight": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5", "mid_lr_weight": "2",
                 "up_lr_weight": "1.5"},
}


def _groups(family: str, rate_flags: list[str], network_args: dict):
    module, encoders, denoiser = _models(family)
    extra = dict(network_args)
    if family == "sd3":
        extra["train_t5xxl"] = "True"
    net = module.create_network(1.0, 4, 2, None, encoders, denoiser, **extra)
    net.apply_to(encoders, denoiser, True, True)
    parser = network_training_parser("test")
    add_sdxl_args(parser)
    args = parser.parse_args(["--learning_rate", str(LR), *rate_flags])
    groups, names = NetworkAdapter(net).optimizer_groups(text_encoder_rates(args), None, LR)
    return net, groups, names


def _encoder_of(net, name: str) -> int:
    return net.encoder_of[name]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
@pytest.mark.parametrize("rates", list(RATE_FLAGS))
@pytest.mark.parametrize("variant", list(NETWORK_ARGS))
def test_every_parameter_in_exactly_one_group(family, rates, variant):
    if variant == "block_lr" and family == "sd3":
        pytest.skip("block learning rates are a networks.lora (UNet) option")
    net, groups, names = _groups(family, RATE_FLAGS[rates], NETWORK_ARGS[variant])
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for p in group["params"]:
            assert id(p) not in seen, f"a parameter is in groups {names[seen[id(p)]]} and {names[gi]}"
            seen[id(p)] = gi
    trainable = list(net.get_trainable_params())
    missing = [n for n, p in net.named_parameters() if id(p) not in seen]
    assert not missing, f"{len(missing)} parameters in no optimizer group, e.g. {missing[:3]} (groups {names})"
    assert len(seen) == len(trainable)
    assert net.text_encoder_loras, "the test needs text-encoder modules"

    # and each text-encoder module trains at the rate asked for its encoder
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    expected = {"one": [TE1] * 3, "two": [TE1, TE2, LR], "three": [TE1, TE2, TE3],
                "per_encoder": [TE1, TE2, LR], "none": [LR] * 3}[rates]
    plus = 4.0 if variant == "loraplus" else 1.0
    for m in net.text_encoder_loras:
        want = expected[_encoder_of(net, m.lora_name)]
        assert lr_of[id(m.lora_down.weight)] == pytest.approx(want), m.lora_name
        assert lr_of[id(m.lora_up.weight)] == pytest.approx(want * plus), m.lora_name
