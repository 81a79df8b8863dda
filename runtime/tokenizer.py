"""CLIP's BPE tokenizer for SD2 bundles, without torch or transformers.

It reproduces the ids of transformers' slow ``CLIPTokenizer`` as diffusers' ``StableDiffusionPipeline`` calls it
(``padding="max_length", truncation=True``) where ``ftfy`` is not installed: the slow tokenizer then cleans text like
BERT's ``BasicTokenizer``. transformers' fast tokenizer (and its ``tokenizer.json``) differs from it in a few places,
which the pipeline here follows the slow tokenizer in:

* control and format characters (NUL, U+FFFD, zero-width spaces and joiners, soft hyphens, ...) are deleted, which can
  join the words on either side of them;
* each CJK ideograph is a word of its own;
* a capital sigma that ends a word lowercases to "ς" (Python's ``str.lower``), not "σ";
* U+0345 (combining ypogegrammeni) separates words instead of being a symbol of its own.

One difference is left: "<|endoftext|>" or "<|startoftext|>" that only appears once the text is cleaned (written in
capitals, say) and follows a punctuation mark directly becomes the special token here but plain text in transformers.
With ``ftfy`` installed, transformers cleans text differently again (no CJK split, ftfy's fixes).

>>> tok = ClipTokenizer.load(Path("bundles/sd2.1/tokenizer"))
>>> ids = tok.encode(["a red fox in the snow"])  # int64, shape (1, tok.max_length)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Without a model_max_length, CLIP's text encoder still only has 77 position embeddings.
DEFAULT_MAX_LENGTH = 77
MAX_SANE_LENGTH = 1 << 20
# OpenAI's CLIP uses only this many merges of its file, and CLIPTokenizer reads no more.
MAX_MERGES = 49152 - 256 - 2

# BasicTokenizer._clean_text: drops every category-C character but tab/newline/CR, plus NUL and U+FFFD.
_CONTROL = r"[\p{C}&&[^\t\n\r]]|\x{FFFD}"
# Python's Final_Sigma rule: Σ after a cased letter and not before one, skipping case-ignorable characters (which
# may be cased too: U+0345, modifier letters).
_CASED = r"[\p{Cased}&&\P{Case_Ignorable}]"
_FINAL_SIGMA = rf"(?<={_CASED}\p{{Case_Ignorable}}*)Σ(?!\p{{Case_Ignorable}}*{_CASED})"
# BasicTokenizer._is_chinese_char's ranges; it puts spaces around these characters.
_CJK = (
    r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]"
)
# CLIPTokenizer's word pattern (its special-token alternatives are handled as added tokens instead).
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """Turns prompts into the fixed-length id rows CLIP's text encoder takes: bos, tokens, eos, then padding."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_id: int, eos_id: int) -> None:
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._pad_id = pad_id
        self._eos_id = eos_id

    @property
    def max_length(self) -> int:
        """Length of every encoded row (``model_max_length`` of the bundle, 77 for SD2)."""
        return self._max_length

    @property
    def pad_id(self) -> int:
        """Id written after eos up to ``max_length`` (SD2 pads with "!", id 0)."""
        return self._pad_id

    @classmethod
    def load(cls, folder: Path) -> ClipTokenizer:
        """Load a bundle's ``tokenizer/`` folder.

        The vocabulary comes from ``tokenizer.json`` when the folder has one, else from ``vocab.json`` and
        ``merges.txt``; special tokens and ``model_max_length`` come from ``tokenizer_config.json`` and
        ``special_tokens_map.json``. The text cleanup is always CLIPTokenizer's (see the module docstring), also
        for a ``tokenizer.json`` written by transformers' fast tokenizer.
        """
        folder = Path(folder)
        config, decoder = _read_config(folder)
        bos = _content(config.get("bos_token")) or BOS
        eos = _content(config.get("eos_token")) or EOS
        unk = _content(config.get("unk_token")) or EOS
        pad = _content(config.get("pad_token")) or eos
        json_file = folder / "tokenizer.json"
        if json_file.is_file():
            tokenizer = _bpe_from_json(json_file, decoder)
        else:
            tokenizer = _bpe_from_files(folder, unk, decoder)
        tokenizer.normalizer = normalizers.Sequence(
            [
                normalizers.Replace(Regex(_CONTROL), ""),
                normalizers.NFC(),
                normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Replace(Regex(_FINAL_SIGMA), "ς"),
                # CLIPTokenizer's case-insensitive word pattern matches nothing at U+0345 (it case-folds to a letter
                # but is not one), so that character ends up skipped like a space.
                normalizers.Replace("\u0345", " "),
                normalizers.Lowercase(),
            ]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )

        # Added tokens, matched before the BPE like the slow tokenizer's trie. Saved ones keep their saved ids; a
        # special token found nowhere else gets the next free id, in transformers' order.
        specs = [t for _, t in decoder]
        named = {"bos": bos, "eos": eos, "unk": unk, "pad": pad}
        specs += [_spec(config.get(f"{k}_token"), v) for k, v in named.items()]
        specs += [{"content": t, "special": True} for t in (BOS, EOS) if tokenizer.token_to_id(t) is not None]
        seen: set[str] = set()
        for spec in specs:
            content = _content(spec)
            if content is None or content in seen:
                continue
            seen.add(content)
            tokenizer.add_tokens(
                [
                    AddedToken(
                        content,
                        single_word=bool(spec.get("single_word", False)),
                        lstrip=bool(spec.get("lstrip", False)),
                        rstrip=bool(spec.get("rstrip", False)),
                        # The slow tokenizer matches added tokens in the raw text, but its word pattern and BPE
                        # cache also turn the two CLIP markers into their ids once the text is cleaned.
                        normalized=content in (BOS, EOS),
                        special=bool(spec.get("special", False)),
                    )
                ]
            )

        bos_id, eos_id, pad_id = (tokenizer.token_to_id(t) for t in (bos, eos, pad))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0 {eos}:0", special_tokens=[(bos, bos_id), (eos, eos_id)]
        )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        max_length = int(config.get("model_max_length") or DEFAULT_MAX_LENGTH)
        if max_length > MAX_SANE_LENGTH:  # transformers' "no limit" placeholder (1e30)
            max_length = DEFAULT_MAX_LENGTH
        return cls(tokenizer, max_length, pad_id, eos_id)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Encode prompts into an int64 array of shape ``(len(prompts), max_length)``.

        Each row is bos, the prompt's tokens, eos, then the pad id. A prompt that does not fit loses its last tokens
        (eos stays last) and a warning names the dropped text, as diffusers does.
        """
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        out = np.full((len(prompts), self._max_length), self._pad_id, dtype=np.int64)
        for row, (prompt, enc) in enumerate(zip(prompts, self._tokenizer.encode_batch(list(prompts)), strict=True)):
            ids = enc.ids
            if len(ids) > self._max_length:
                keep = self._max_length - 1
                start, end = enc.offsets[keep][0], enc.offsets[-2][1]
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to "
                    "%d tokens (%d tokens dropped): %r",
                    self._max_length,
                    len(ids) - self._max_length,
                    prompt[start:end],
                )
                ids = [*ids[:keep], self._eos_id]
            out[row, : len(ids)] = ids
        return out


def _read_config(folder: Path) -> tuple[dict, list[tuple[int, dict]]]:
    """The tokenizer settings and the saved added tokens (id, AddedToken dict) in id order, read as transformers does.

    Files saved by recent transformers list the added tokens in tokenizer_config.json; older ones keep the special
    tokens in special_tokens_map.json (which then wins over tokenizer_config.json) and the rest in added_tokens.json.
    """
    config: dict = {}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
    added = config.get("added_tokens_decoder")
    if added is None:
        path = folder / "special_tokens_map.json"
        if path.is_file():
            config.update(json.loads(path.read_text(encoding="utf-8")))
        path = folder / "added_tokens.json"
        legacy = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        added = {i: {"content": t} for t, i in legacy.items()}
    decoder = sorted(
        ((int(i), t if isinstance(t, dict) else {"content": t}) for i, t in added.items()), key=lambda it: it[0]
    )
    return config, decoder


def _content(token: object) -> str | None:
    """A special token as the files write it: a plain string or an AddedToken dict with a "content" key."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _spec(token: object, content: str) -> dict:
    """A special token's added-token settings: the file's dict when it wrote one, else defaults."""
    spec = dict(token) if isinstance(token, dict) else {}
    return {**spec, "content": content, "special": True}


def _bpe_from_json(path: Path, decoder: list[tuple[int, dict]]) -> Tokenizer:
    """The BPE model of a tokenizer.json. Its added tokens move to ``decoder``, to be set up again like the others
    (tokenizers keeps matching an added token the old way when it is only re-added with new settings)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    # Where tokenizer_config.json lists the same token, tokenizer.json's id wins, as in transformers' fast tokenizer.
    from_json = {t["content"]: (t["id"], t) for t in data.pop("added_tokens", None) or []}
    decoder[:] = sorted(
        [*(it for it in decoder if it[1].get("content") not in from_json), *from_json.values()], key=lambda it: it[0]
    )
    _keep_added_ids(data["model"]["vocab"], decoder)
    return Tokenizer.from_str(json.dumps(data))


def _keep_added_ids(vocab: dict[str, int], decoder: list[tuple[int, dict]]) -> None:
    """Put added tokens into the BPE vocabulary with the ids transformers saved, which tokenizers then reuses."""
    vocab.update(
        {t["content"]: i for i, t in decoder if isinstance(t.get("content"), str) and t["content"] not in vocab}
    )


def _bpe_from_files(folder: Path, unk: str, decoder: list[tuple[int, dict]]) -> Tokenizer:
    """The BPE model transformers' CLIP converter builds from vocab.json and merges.txt."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_file, merges_file):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json and no {path.name}")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    _keep_added_ids(vocab, decoder)
    # Like CLIPTokenizer: the first line is the "#version" header and is skipped unread.
    lines = merges_file.read_text(encoding="utf-8").strip().split("\n")[1 : MAX_MERGES + 1]
    merges = list(dict.fromkeys(tuple(line.split()) for line in lines))
    merges = [m for m in merges if len(m) == 2]
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=unk,
    )
    return Tokenizer(model)
