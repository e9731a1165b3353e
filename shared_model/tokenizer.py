"""WordPiece tokenizer for the BERT text tower.

With ``cfg.checkpoint`` set, the tokenizer files of that BiomedCLIP folder are used (``vocab.txt``,
``tokenizer_config.json`` and/or ``tokenizer.json``, as written by transformers / the Hub). Otherwise the
packaged ``assets/tiny_vocab.txt`` is used: a few hundred lowercase caption words plus single
characters and ``##`` continuations, so that any text tokenises. :func:`tiny_vocab` regenerates it.

Tokens are ``[CLS] text [SEP]``, truncated to ``context_length - n_ctx`` (the learnable context
vectors take the remaining positions) and padded to the longest text of the batch.
"""

from __future__ import annotations

import inspect
import json
import os
import string
from pathlib import Path
from typing import Sequence

import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from shared_model.config import ClipConfig, ConfigError

TINY_VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "tiny_vocab.txt"
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
    out: list[str] = []
    for tok in (*SPECIAL_TOKENS, *TINY_WORDS, *chars, *pieces):
        if tok not in out:
            out.append(tok)
    return out


def _bert_tokenizer_from_vocab(path: Path) -> PreTrainedTokenizerBase:
    """BertTokenizerFast from a plain ``vocab.txt``-style file (transformers 4.x and 5.x)."""
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    return BertTokenizerFast(**{key: str(path)}, do_lower_case=True)


class Tokenizer:
    """Callable text -> (input_ids, attention_mask) for :class:`shared_model.clip_text.ClipText`.

    Attributes:
        hf: The underlying transformers tokenizer.
        max_length: Longest token sequence produced, [CLS] and [SEP] included.
        source: File or folder the vocabulary came from.
    """

    def __init__(self, hf: PreTrainedTokenizerBase, max_length: int, vocab_size: int, source: Path):
        if len(hf) > vocab_size:
            raise ConfigError(
                f"model.clip.text.vocab_size: the tokenizer from {source} has {len(hf)} tokens, more than "
                f"the text tower's vocab_size {vocab_size}; ids would fall outside the embedding table"
            )
        if max_length < 2:
            raise ConfigError(
                f"model.clip.text.context_length: context_length - n_ctx = {max_length} leaves no room "
                "for [CLS] and [SEP]"
            )
        self.hf = hf
        self.max_length = max_length
        self.source = source

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
        enc = self.hf(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids (one sequence) -> text, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, folder: str | Path) -> None:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` (the BiomedCLIP folder layout)."""
        folder = Path(folder)
        vocab = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
        if [i for _, i in vocab] != list(range(len(vocab))):
            raise ValueError(f"tokenizer from {self.source}: vocabulary ids are not contiguous")
        (folder / "vocab.txt").write_text("".join(tok + "\n" for tok, _ in vocab), encoding="utf-8")
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": bool(getattr(self.hf, "do_lower_case", True)),
            "model_max_length": self.max_length,
            **{name: getattr(self.hf, name) for name in
               ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_hf_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The BERT tokenizer stored in a checkpoint folder (no download).

    Raises:
        FileNotFoundError: If the folder has neither ``vocab.txt`` nor ``tokenizer.json``.
    """
    folder = Path(folder)
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer files (vocab.txt or tokenizer.json) in the folder")
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def _tiny_vocab_file() -> Path:
    """The packaged tiny vocabulary, or the same list written to a temporary file when the asset is absent.

    A Flower app bundle (FAB) carries only .py/.toml/.md/.yaml/.json files, so a ServerApp or ClientApp
    run from a FAB in deployment has no ``assets/tiny_vocab.txt``.
    """
    if TINY_VOCAB_PATH.is_file():
        return TINY_VOCAB_PATH
    import hashlib
    import tempfile

    text = "\n".join(tiny_vocab()) + "\n"
    path = Path(tempfile.gettempdir()) / f"promptsam-tiny-vocab-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def build_tokenizer(cfg: ClipConfig) -> Tokenizer:
    """The tokenizer for ``cfg``: the checkpoint folder's files, else the packaged tiny vocabulary.

    Raises:
        ConfigError: If the vocabulary is larger than ``cfg.text.vocab_size`` or the context is too short.
        FileNotFoundError: If the checkpoint folder or its tokenizer files are missing.
    """
    if cfg.checkpoint:
        folder = Path(cfg.checkpoint)
        if not folder.is_dir():
            raise FileNotFoundError(f"model.clip.checkpoint: folder not found: {folder}")
        hf, source = load_hf_tokenizer(folder), folder
    else:
        source = _tiny_vocab_file()
        hf = _bert_tokenizer_from_vocab(source)
    return Tokenizer(hf, cfg.text.context_length - cfg.text.n_ctx, cfg.text.vocab_size, source)
