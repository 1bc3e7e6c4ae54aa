"""Textual inversion: a few new token vectors as what is trained (train_textual_inversion.py,
sdxl_train_textual_inversion.py).

:class:`TokenTraining` is the "what is trained" object the trainer asks (see
:mod:`library.training.trained`); :class:`TokenVectors` is its trainable. The new tokens are added
to each tokenizer (``tok``, ``tok1``, ...); each text encoder's token embedding is wrapped so that
ids past the original vocabulary read the trained vectors, and everything else reads the original
table, which is never written: after a run every original row and every other weight of the model
is as loaded, by construction. Captions (and sample prompts) name the concept with one word, the
token string; the wrapped tokenizers expand it into all of its tokens.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AddedToken

from library.config.token_training import TokenConfig
from library.data.dataset import DatasetGroup
from library.families.base import LoadedModels, ModelFamily
from library.models.checkpoints import text_encoder_widths
from library.models.textual_inversion import ExpandingTokenizer, read_vectors, token_names, write_embedding
from library.training import kohya_state
from library.training.trained import OwnTrainable, WhatIsTrained
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


class TokenEmbeddings(nn.Module):
    """A token embedding table plus trained rows for the ids after it."""

    def __init__(self, base: nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base, self.first = base, base.num_embeddings
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for the table's dtype and width
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        added = ids >= self.first
        out = self.base(torch.where(added, torch.zeros_like(ids), ids))
        if not added.any():
            return out
        new = self.vectors[(ids - self.first).clamp(min=0)].to(out.dtype)
        return torch.where(added.unsqueeze(-1), new, out)


class CaptionTemplates:
    """``--use_object_template`` / ``--use_style_template``: every caption replaced by a template
    around the token, drawn from the sample's own generator (so a resumed run draws the same)."""

    def __init__(self, templates: tuple[str, ...], token: str):
        self.templates, self.token = templates, token

    def __call__(self, caption: str, rng: random.Random) -> str:
        return rng.choice(self.templates).format(self.token)


class TokenVectors(OwnTrainable):
    """The new vectors of every text encoder that takes an embedding (SD: one; SDXL: two)."""

    def __init__(self, family: ModelFamily, models: LoadedModels, cfg: TokenConfig):
        self.family, self.models, self.cfg = family, models, cfg
        self.keys = family.textual_inversion_keys
        for module in [models.denoiser, models.vae, *models.text_encoders]:
            module.requires_grad_(False)
        start = self._start_vectors()
        tokens = token_names(cfg.token_string, cfg.num_vectors)
        wrappers = []
        for i, vectors in enumerate(start):
            tokenizer, encoder = models.tokenizers[i], models.text_encoders[i]
            wrapper = TokenEmbeddings(encoder.get_input_embeddings(), vectors)
            encoder.set_input_embeddings(wrapper)
            wrappers.append(wrapper)
            if cfg.num_vectors > 1:  # "tok" in a caption or prompt stands for "tok tok1 ..."
                models.tokenizers[i] = ExpandingTokenizer(tokenizer, {cfg.token_string: " ".join(tokens)})
        #: what the loop calls the network: state folders hold its state_dict, samples toggle its mode
        self.net = nn.ParameterList([w.vectors for w in wrappers])

    def _start_vectors(self) -> list[torch.Tensor]:
        """Add the tokens to each tokenizer; the vectors start from --weights, the --init_word's
        embedding (its tokens repeated over the vectors, as kohya does), or small random ones."""
        cfg, models = self.cfg, self.models
        loaded = read_vectors(Path(cfg.weights), self.keys, "--weights") if cfg.weights else None
        start = []
        for i in range(len(self.keys)):
            tokenizer, table = models.tokenizers[i], models.text_encoders[i].get_input_embeddings().weight
            add_tokens(tokenizer, cfg.token_string, cfg.num_vectors, table.shape[0])
            if loaded is not None:
                vectors = loaded[i]
                if tuple(vectors.shape) != (cfg.num_vectors, table.shape[1]):
                    raise UserError(f"--weights {cfg.weights}: {tuple(vectors.shape)} vectors (count, width), this "
                                    f"run needs ({cfg.num_vectors}, {table.shape[1]}): set --num_vectors_per_token "
                                    "to its count, or use a file made for this model family")
            elif cfg.init_word:
                ids = init_ids(tokenizer, cfg.init_word, cfg.num_vectors)
                vectors = table.detach()[[ids[k % len(ids)] for k in range(cfg.num_vectors)]]
            else:
                vectors = torch.randn(cfg.num_vectors, table.shape[1]) * table.detach().float().std()
            start.append(vectors)
        return start

    def optimizer_groups(self, text_encoder_lr, unet_lr: float | None, default_lr: float):
        return [{"params": list(self.net), "lr": default_lr}], ["embeddings"]

    def trainable_params(self) -> list[nn.Parameter]:
        return list(self.net)

    def to(self, device, dtype: torch.dtype | None = None) -> TokenVectors:
        self.net.to(device, dtype)
        return self

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        vectors = [v.detach().to(dtype or torch.float32) for v in self.net]
        write_embedding(path, vectors, self.keys, self.cfg.token_string, metadata)


def add_tokens(tokenizer, token: str, count: int, table_rows: int | None = None) -> None:
    """The tokens of the concept added to ``tokenizer`` right after its ``table_rows`` ids (the
    text encoder's table; None: the tokenizer's own length), each one a token of its own in any
    caption."""
    table_rows = len(tokenizer) if table_rows is None else table_rows
    if len(tokenizer) != table_rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder's table {table_rows} rows; "
                        "textual inversion needs them to match (a tokenizer of another model?)")
    known = tokenizer.tokenize(token)
    if len(known) == 1 and known[0] in tokenizer.get_vocab():
        raise UserError(f"--token_string {token}: already a word the tokenizer knows ({known[0]}); training it would "
                        f"change that word everywhere. Pick a made-up word (e.g. {token}x or zq{token})")
    names = token_names(token, count)
    added = tokenizer.add_tokens([AddedToken(n, normalized=False) for n in names])
    if added != count:
        raise UserError(f"--token_string {token}: one of {names} is already a token of the tokenizer; pick another "
                        "word")
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if ids != [table_rows]:
        raise UserError(f"--token_string {token}: the tokenizer still splits it into {len(ids)} tokens (it lowercases "
                        "and splits on punctuation); use one lowercase word of letters and digits")


def init_ids(tokenizer, word: str, count: int) -> list[int]:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--init_word {word!r}: no tokens")
    if len(ids) > count:
        raise UserError(f"--init_word {word!r} is {len(ids)} tokens; --num_vectors_per_token is {count}: raise it to "
                        f"at least {len(ids)} or pick a shorter word")
    return ids


class TokenTraining(WhatIsTrained):
    """New token vectors trained on the frozen model (textual inversion)."""

    state_weights = "embeddings.safetensors"
    weights_title = "token vectors"
    layout_scripts = {"sd1": "train_textual_inversion.py", "sd2": "train_textual_inversion.py",
                      "sdxl": "sdxl_train_textual_inversion.py",
                      "sd3": "sd3_train_network.py: textual inversion is not available for SD3 (train a LoRA instead)"}
    nothing_to_train = "nothing to train: --learning_rate is 0"

    def __init__(self, cfg: TokenConfig, model_path: str, tokenizer_dir: str | None = None):
        self.cfg, self.model_path, self.tokenizer_dir = cfg, model_path, tokenizer_dir

    def check(self, family: ModelFamily) -> None:
        """Before any model loads: the family takes embeddings, and on the model's own tokenizers
        the token string is a new word of one token, the init word fits the vectors, and
        --weights holds that many vectors."""
        keys = family.textual_inversion_keys
        if not keys:
            raise UserError(f"textual inversion is not available for {family.title or family.name} models in this "
                            "version; train a LoRA instead")
        cfg = self.cfg
        if cfg.weights:
            self._check_weights_file(keys)
        for tokenizer in family.load_tokenizers(self.model_path, self.tokenizer_dir) or []:
            add_tokens(tokenizer, cfg.token_string, cfg.num_vectors)  # on a copy that is thrown away
            if cfg.init_word and not cfg.weights:
                init_ids(tokenizer, cfg.init_word, cfg.num_vectors)

    def _check_weights_file(self, keys: tuple[str, ...]) -> None:
        """--weights holds --num_vectors_per_token vectors per encoder, each as wide as that encoder's
        embeddings (widths read from the model's header or configs; a .ckpt is checked once loaded)."""
        cfg = self.cfg
        vectors = read_vectors(Path(cfg.weights), keys, "--weights")
        counts = {v.shape[0] for v in vectors}
        if counts != {cfg.num_vectors}:
            raise UserError(f"--weights {cfg.weights}: {sorted(counts)} vector(s) per encoder, but "
                            f"--num_vectors_per_token is {cfg.num_vectors}; set it to the file's count")
        widths = text_encoder_widths(self.model_path)
        for key, v, width in zip(keys, vectors, widths or []):
            if v.shape[1] != width:
                raise UserError(f"--weights {cfg.weights}: {key or 'the'} vectors are {v.shape[1]} wide, the model's "
                                f"text encoder takes {width}: this embedding was made for another model family "
                                "(SD1 768, SD2 1024, SDXL 768 + 1280)")

    def load_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The model is frozen: it is loaded in the mixed-precision dtype (the vectors are float32)."""
        return weight_dtype

    def prepare_captions(self, group: DatasetGroup) -> None:
        """Captions must name the concept: a subset none of whose captions holds the token string is
        refused, naming it (unless the templates write every caption)."""
        token = self.cfg.token_string
        if self.cfg.templates:
            group.set_caption_rewrite(CaptionTemplates(self.cfg.templates, token))
            return
        subsets = {}
        for item in group.items:
            subsets.setdefault(id(item.subset), [item.subset, False])[1] |= _names(item.caption, token)
        missing = [s.image_dir for s, found in subsets.values() if not found and not s.is_reg]
        if missing:
            raise UserError(f"no caption of {', '.join(str(m) for m in missing)} contains --token_string {token}: the "
                            "vectors learn from captions that name them. Add the word to the captions (or "
                            "class_tokens), or use --use_object_template / --use_style_template")

    def checkpointed_text_encoders(self, family: ModelFamily, models: LoadedModels) -> list[nn.Module]:
        """None: the text encoders are frozen (only the vectors at their input train)."""
        return []

    def build(self, family: ModelFamily, models: LoadedModels) -> TokenVectors:
        return TokenVectors(family, models, self.cfg)

    @property
    def trains_text_encoders(self) -> bool:
        """The vectors are read by the text encoders: their outputs change (no caching, gradients on)."""
        return True

    def trains_text_encoders_at(self, step: int) -> bool:
        return True

    def fingerprint(self) -> dict:
        c = self.cfg
        return {"trained": "tokens", "token": c.token_string, "vectors": c.num_vectors, "init_word": c.init_word,
                "templates": len(c.templates)}

    def metadata(self, family_metadata: dict[str, str]) -> dict[str, str]:
        """The family's keys; the modelspec architecture is the base's with ``/textual-inversion``."""
        c = self.cfg
        return {**family_metadata, "modelspec.architecture": f"{family_metadata['modelspec.architecture']}"
                                                            "/textual-inversion",
                "ss_token_string": c.token_string, "ss_num_vectors_per_token": str(c.num_vectors),
                "ss_init_word": str(c.init_word)}

    def restore_kohya(self, state: kohya_state.KohyaState, trainable: TokenVectors, optimizer) -> bool:
        raise UserError(f"--resume {state.folder}: a state folder kohya's scripts wrote; textual inversion runs resume "
                        "from this toolkit's own state folders only (the embedding it saved can start a new run with "
                        "--weights)")


def _names(caption: str, token: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", caption or "") is not None
