"""Adapter for transformers ``T5ForConditionalGeneration`` (the language suites).

Normalised keys are the model's own ``state_dict()`` keys:

==========================================================================  ======  =====
key                                                                          kind    block
==========================================================================  ======  =====
``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``                 attn    i
``decoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``                 attn    i
``decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight``               attn    i
``encoder.block.{i}.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}.weight``        mlp     i
``decoder.block.{i}.layer.2.DenseReluDense.{wi,wi_0,wi_1,wo}.weight``        mlp     i
``{encoder,decoder}.block.{i}.layer.{j}.layer_norm.weight``                  norm    i
``{encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight``  other  0
``shared.weight``, ``{encoder,decoder}.embed_tokens.weight``                 embed   None
``lm_head.weight``                                                           head    None
``{encoder,decoder}.final_layer_norm.weight``                                norm    None
==========================================================================  ======  =====

Depth index (used by LiNeS): **encoder block i and decoder block i both get block i**, so
the two stacks are scaled in parallel from shallow to deep and ``num_blocks`` is the depth
of the deeper stack. This keeps ``layer_info`` a function of the key alone (a running index
``L_enc + i`` for the decoder would need the encoder depth), and it is what LiNeS's
reference code does on T5 keys, which matches blocks by the substring ``.{i}.``.

T5 ties ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (and ``lm_head``
when ``tie_word_embeddings``); the tower state dict holds every name, as the module's
``state_dict()`` does, and ``tower_state_dict`` fills tied names that a saved checkpoint
omitted from ``shared.weight``.

Text tasks (:mod:`submerge.data.language`) score answers through :meth:`HFT5Adapter.score_choices`
(rank classification by teacher-forced log-likelihood) and :meth:`HFT5Adapter.generate`
(greedy decoding), as r-three/mats' ``EncoderDecoderWrapper`` does.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import torch

from submerge.errors import ConfigError
from submerge.models import StateDict, TransformersAdapter, block_count

log = logging.getLogger(__name__)

_E = r"encoder\.block\.(?P<block>\d+)\.layer\."
_D = r"decoder\.block\.(?P<block>\d+)\.layer\."
_FFN = r"DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight"
_REL_KEY = "0.SelfAttention.relative_attention_bias.weight"
_REL = re.escape(_REL_KEY)
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
_SCORINGS = ("sum", "mean")


class HFT5Adapter(TransformersAdapter):
    """transformers ``T5ForConditionalGeneration`` (encoder and decoder stacks)."""

    name = "hf_t5"
    rules = (
        (re.compile(_E + r"0\.SelfAttention\.[qkvo]\.weight"), "attn", 1),
        (re.compile(_D + r"0\.SelfAttention\.[qkvo]\.weight"), "attn", 1),
        (re.compile(_D + r"1\.EncDecAttention\.[qkvo]\.weight"), "attn", 1),
        (re.compile(_E + r"1\." + _FFN), "mlp", 1),
        (re.compile(_D + r"2\." + _FFN), "mlp", 1),
        (re.compile(_E + r"[01]\.layer_norm\.weight"), "norm", 1),
        (re.compile(_D + r"[012]\.layer_norm\.weight"), "norm", 1),
        (re.compile(_E + _REL), "other", 1),
        (re.compile(_D + _REL), "other", 1),
        (re.compile(r"shared\.weight|(encoder|decoder)\.embed_tokens\.weight"), "embed", 1),
        (re.compile(r"lm_head\.weight"), "head", 1),
        (re.compile(r"(encoder|decoder)\.final_layer_norm\.weight"), "norm", 1),
    )

    def required_keys(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        n_enc = max(block_count(state_dict, r"^encoder\.block\.(\d+)\."), 1)
        n_dec = max(block_count(state_dict, r"^decoder\.block\.(\d+)\."), 1)
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state_dict
        ffn = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
        attn = [f"{m}.weight" for m in "qkvo"]
        keys = ["shared.weight", *_TIED, "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight",
                "encoder.block.0.layer." + _REL_KEY, "decoder.block.0.layer." + _REL_KEY]
        for i in range(n_enc):
            p = f"encoder.block.{i}.layer."
            keys += [p + "0.SelfAttention." + a for a in attn]
            keys += [p + "0.layer_norm.weight", p + "1.layer_norm.weight"]
            keys += [p + f"1.DenseReluDense.{w}.weight" for w in ffn]
        for i in range(n_dec):
            p = f"decoder.block.{i}.layer."
            keys += [p + "0.SelfAttention." + a for a in attn] + [p + "1.EncDecAttention." + a for a in attn]
            keys += [p + f"{j}.layer_norm.weight" for j in range(3)]
            keys += [p + f"2.DenseReluDense.{w}.weight" for w in ffn]
        return keys

    def tower_state_dict(self, raw: Mapping[str, torch.Tensor]) -> StateDict:
        """The full model's state dict, tied names filled in; CheckpointError if it is not T5."""
        tower = dict(raw)
        if "shared.weight" not in tower and "encoder.embed_tokens.weight" in tower:
            tower["shared.weight"] = tower["encoder.embed_tokens.weight"]
        for key in _TIED:
            if key not in tower and "shared.weight" in tower:
                log.info("hf_t5: %r absent from the checkpoint, tied to 'shared.weight'", key)
                tower[key] = tower["shared.weight"]
        self.check_tower(tower)
        return tower

    def build(self, arch: dict) -> torch.nn.Module:
        """``T5ForConditionalGeneration`` from a ``T5Config`` dict, random init, eval mode."""
        from transformers import T5Config, T5ForConditionalGeneration

        if not isinstance(arch, Mapping):
            raise ConfigError(f"{self.name}: arch must be a mapping of T5Config fields, got {arch!r}")
        try:
            config = T5Config.from_dict(dict(arch))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name}: invalid T5Config {dict(arch)!r}: {exc}") from exc
        return T5ForConditionalGeneration(config).eval()

    model_class = "T5ForConditionalGeneration"

    def encode(self, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token logits ``(B, T_dec, vocab)`` of a batch.

        ``inputs`` holds ``input_ids`` and ``attention_mask`` and either ``labels`` or
        ``decoder_input_ids`` (as a tokenizer + label encoding gives them); the caller scores
        answers or class names from the logits.
        """
        if "input_ids" not in inputs or not ({"labels", "decoder_input_ids"} & set(inputs)):
            raise ValueError(f"{self.name}.encode needs input_ids and labels or decoder_input_ids, "
                             f"got fields {sorted(inputs)}")
        return module(**inputs).logits

    @torch.no_grad()
    def score_choices(self, module: torch.nn.Module, tokenizer, inputs: Sequence[str],
                      choices: Sequence[Sequence[str]], *, device="cpu",
                      scoring: str = "sum") -> list[torch.Tensor]:
        """Per input, a float32 tensor with the score of each of its answer choices.

        The input is encoded once; each choice's tokens (as the tokenizer writes them, with
        ``</s>``) are scored by teacher forcing; pad positions are ignored. ``scoring``:
        "sum" of token log-probabilities, or their "mean".
        """
        from transformers.modeling_outputs import BaseModelOutput

        if scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
        counts = [len(c) for c in choices]
        if len(counts) != len(inputs) or min(counts, default=1) < 1:
            raise ValueError("every input needs a non-empty list of answer choices")
        enc = tokenizer(list(inputs), padding=True, truncation=True, return_tensors="pt").to(device)
        tgt = tokenizer([c for cs in choices for c in cs], padding=True, truncation=True,
                        return_tensors="pt").to(device)
        hidden = module.get_encoder()(input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"]).last_hidden_state
        repeats = torch.tensor(counts, device=hidden.device)
        token_mask = tgt["attention_mask"].bool()
        labels = tgt["input_ids"].masked_fill(~token_mask, -100)  # T5's shift turns -100 into pad
        logits = module(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(repeats, dim=0)),
            attention_mask=enc["attention_mask"].repeat_interleave(repeats, dim=0),
            decoder_input_ids=module.prepare_decoder_input_ids_from_labels(labels=labels),
        ).logits.float()
        # log p(token) = logit(token) - logsumexp(logits), without materialising a log_softmax copy
        token_ll = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        token_ll = token_ll.masked_fill(~token_mask, 0.0)
        scores = token_ll.sum(dim=-1)
        if scoring == "mean":
            scores = scores / token_mask.sum(dim=-1)
        return list(scores.cpu().split(counts))

    @torch.no_grad()
    def generate(self, module: torch.nn.Module, tokenizer, inputs: Sequence[str], *, device="cpu",
                 max_new_tokens: int = 64) -> list[str]:
        """Greedy generations (``do_sample=False, num_beams=1``) for ``inputs``, decoded without
        special tokens and stripped."""
        enc = tokenizer(list(inputs), padding=True, truncation=True, return_tensors="pt").to(device)
        out = module.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]
