"""Tokenizer for the BERT text tower: open_clip's ``HFTokenizer``, plus the attention mask.

The vocabulary is the one of the open_clip folder the model is built from (:mod:`shared_model.modeling.biomedclip`):
a user's BiomedCLIP folder, or the folder written for a preset, which holds the packaged
``assets/tiny_vocab.txt`` (a few hundred lowercase caption words plus single characters and ``##``
continuations, so that any text tokenises; :func:`tiny_vocab` regenerates it).

Tokens are ``[CLS] text [SEP]``, truncated to ``context_length - n_ctx`` (the learnable context vectors
take the remaining positions) and padded to the longest text of the batch.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Sequence

import torch
from open_clip.tokenizer import HFTokenizer

from shared_model.config import ConfigError

TINY_VOCAB_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny_vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Caption and prompt words of the tiny vocabulary (see data captions: count, size, colour, shape, location).
TINY_WORDS = """
one two three four five six seven eight nine ten several multiple many few no not single visible largest smallest
small medium large tiny big huge little
pink red white yellow brown dark light pale bright
round oval irregular flat elongated sessile pedunculated smooth rough
left right top bottom centre center middle upper lower side corner edge
polyp polyps lesion lesions colonoscopy endoscopy endoscopic tissue mucosa colon bowel
kidney brain lung heart liver breast skin tumor tumour tumors organ organs cell cells nodule
photo picture image images scan ct mri ultrasound xray ray benign malignant normal abnormal cancer
located in the of image a an and or with at on near inside there is are this that it its
segment segmentation region area object background foreground mask shape size colour color
""".split()
CONTINUATIONS = ("##s", "##es", "##ed", "##ing", "##ly", "##er", "##al", "##ion")


def tiny_vocab() -> list[str]:
    """The tiny WordPiece vocabulary, one token per entry, in id order.

    Special tokens first ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), then caption words, single
    characters (a-z, 0-9, ASCII punctuation) and ``##`` continuations, without duplicates.
    """
    chars = list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits] + list(CONTINUATIONS)
    return list(dict.fromkeys((*SPECIAL_TOKENS, *TINY_WORDS, *chars, *pieces)))


def tiny_vocab_text() -> str:
    """The packaged ``tiny_vocab.txt``; regenerated when absent (a Flower app bundle carries no .txt file)."""
    return TINY_VOCAB_PATH.read_text() if TINY_VOCAB_PATH.is_file() else "\n".join(tiny_vocab()) + "\n"


class Tokenizer:
    """Callable texts -> (input_ids, attention_mask) for :class:`shared_model.modeling.clip_text.ClipText`.

    Args:
        open_clip_tokenizer: open_clip's tokenizer of the model's folder; its ``context_length`` is the
            longest token sequence produced, [CLS] and [SEP] included.
        vocab_size: The text tower's embedding rows (``model.clip.text.vocab_size``).
        source: The folder the vocabulary came from (for messages).

    Raises:
        ConfigError: If the vocabulary is larger than ``vocab_size`` or no room is left for [CLS] and [SEP].
    """

    def __init__(self, open_clip_tokenizer: HFTokenizer, vocab_size: int, source: Path):
        self.open_clip = open_clip_tokenizer
        self.hf = open_clip_tokenizer.tokenizer
        self.max_length = int(open_clip_tokenizer.context_length)
        self.source = source
        if len(self.hf) > vocab_size:
            raise ConfigError(
                f"model.clip.text.vocab_size: the tokenizer from {source} has {len(self.hf)} tokens, more than "
                f"the text tower's vocab_size {vocab_size}; ids would fall outside the embedding table"
            )
        if self.max_length < 2:
            raise ConfigError(
                f"model.clip.text.context_length: context_length - n_ctx = {self.max_length} leaves no room "
                "for [CLS] and [SEP]"
            )

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def cls_id(self) -> int:
        return int(self.hf.cls_token_id)

    @property
    def sep_id(self) -> int:
        return int(self.hf.sep_token_id)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch.

        Args:
            texts: B strings.

        Returns:
            input_ids: B x L int64, ``[CLS] ... [SEP]`` then [PAD]; L = longest (<= max_length).
            attention_mask: B x L int64, 1 on real tokens, 0 on padding.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Tokenizer expects a list of strings (wrap a single text in a list)")
        if len(texts) == 0:
            raise ValueError("Tokenizer got an empty list of texts")
        ids = self.open_clip(list(texts)).long()  # B x max_length, [PAD] after [SEP]
        mask = (ids != self.pad_id).long()  # as open_clip's HFTextEncoder computes it
        length = int(mask.sum(1).max())
        return ids[:, :length], mask[:, :length]

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids (one sequence) -> text, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True)
