"""Tiny random BLIP and GIT captioners saved in the hub layout (config, weights, processor files)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red", "blue",
         "the", "on", "table", "sign", "girl", "woman", "hair"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=96)


def _tokenizer(folder: Path, **special):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return BertTokenizerFast(str(vocab), do_lower_case=True, model_max_length=64, **special)


def tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _tokenizer(folder, bos_token="[DEC]")
    ids = dict(vocab_size=len(WORDS), bos_token_id=WORDS.index("[DEC]"), pad_token_id=0, sep_token_id=3, eos_token_id=3)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config={**TEXT, **ids}, vision_config=VISION,
                                                    projection_dim=32)).eval()
    model.save_pretrained(folder)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder


def tiny_git(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = _tokenizer(folder)
    torch.manual_seed(seed)
    model = GitForCausalLM(GitConfig(vision_config=VISION, vocab_size=len(WORDS), bos_token_id=2, eos_token_id=3,
                                     pad_token_id=0, **TEXT)).eval()
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder
