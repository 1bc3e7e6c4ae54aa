"""kohya's DeepSpeed flags read into ShardingOptions (library/config/sharding.py): ZeRO stages onto
FSDP2's choices, and every flag or combination this version cannot honour refused by name."""

from __future__ import annotations

import pytest

from library.args.model_training import model_training_parser
from library.config.sharding import sharding_options
from library.utils.errors import UserError


def _args(*flags: str):
    return model_training_parser("test", "fine_tune").parse_args(["--output_dir", "x", *flags])


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_stages_and_offload(two_processes):
    assert sharding_options(_args()) is None
    default = sharding_options(_args("--deepspeed"))
    assert (default.zero_stage, default.reshard_after_forward, default.offload) == (2, False, False)
    three = sharding_options(_args("--deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu"))
    assert (three.reshard_after_forward, three.offload) == (True, True)
    assert sharding_options(_args("--deepspeed", "--offload_optimizer_device", "none")).offload is False
    assert sharding_options(_args("--deepspeed", "--zero_stage", "0")) is None  # stage 0 shards nothing
    assert sharding_options(_args("--deepspeed", "--optimizer_type", "torch.optim.Adam")) is not None


@pytest.mark.parametrize("flags, message", [
    (["--zero_stage", "3"], "--zero_stage: DeepSpeed options; they take effect with --deepspeed"),
    (["--deepspeed", "--offload_optimizer_device", "nvme"], "choose cpu or none; NVMe offloading is not"),
    (["--deepspeed", "--offload_param_nvme_path", "/nvme"], "--offload_param_nvme_path: offloading to NVMe"),
    (["--deepspeed", "--zero3_init_flag"], "--zero3_init_flag: building the model already sharded"),
    (["--deepspeed", "--fp16_master_weights_and_gradients"], "sharded runs keep float32 master weights"),
    (["--deepspeed", "--zero_stage", "0", "--offload_param_device", "cpu"], "shards nothing, so there is nothing"),
    (["--deepspeed", "--torch_compile", "--mixed_precision", "fp16"], "--deepspeed with --torch_compile, "
                                                                      "--mixed_precision fp16: not"),
    (["--deepspeed", "--fused_optimizer_groups", "2"], "--deepspeed with --fused_optimizer_groups"),
    (["--deepspeed", "--optimizer_type", "Adafactor"], "--optimizer_type Adafactor with --deepspeed"),
    (["--deepspeed", "--optimizer_type", "AdamW8bit"], "torch.optim class"),
])
def test_refusals(two_processes, flags, message):
    with pytest.raises(UserError, match=None) as err:
        sharding_options(_args(*flags))
    assert message in str(err.value), str(err.value)


def test_one_process_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError) as err:
        sharding_options(_args("--deepspeed"))
    assert "accelerate launch --num_processes N" in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError):
        sharding_options(_args("--deepspeed", "--zero_stage", "3"))
