#!/usr/bin/env bash
# Set up, build the tiny default (random SD1-architecture model + captioned dataset), and train a
# LoRA on it with sample images and TensorBoard logs. No downloads; a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
.venv/bin/python tools/make_tiny_default.py --out tiny_default
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_network.py \
  --pretrained_model_name_or_path tiny_default/model/tiny-sd15.safetensors \
  --dataset_config tiny_default/dataset.toml \
  --output_dir tiny_default/output --output_name tiny_lora \
  --network_module networks.lora --network_dim 8 --network_alpha 4 \
  --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 0.05 --optimizer_type AdamW \
  --max_train_epochs 4 --save_every_n_epochs 2 --cache_latents --seed 42 \
  --sample_prompts tiny_default/prompts.txt --sample_every_n_epochs 2 \
  --logging_dir tiny_default/logs
echo
echo "LoRA files:    $(ls tiny_default/output/*.safetensors | tr '\n' ' ')"
echo "sample images: tiny_default/output/sample/"
echo "TensorBoard:   .venv/bin/tensorboard --logdir tiny_default/logs"
