"""runtime.tokenizer.ClipTokenizer gives the ids of transformers' slow CLIPTokenizer, as diffusers calls it.

Two vocabularies: the tiny one the tiny model ships (no merges, most characters unknown) and a synthetic byte-level
BPE one whose merges cover ASCII words, accents, CJK and emoji, so that merging and byte-level unicode run for real.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.tiny import write_tokenizer
from runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Hello, World!!! It's the CAT's toy; isn't it? (yes) -- 'quoted' \"double\"",
    "  the   cat\n\nand\tthe  dog \r\n ",
    "café crème brûlée, naïve façade",
    "cafe\u0301 with a combining accent",
    "你好世界 日本語のテキスト 한국어",
    "🔥 fire 🔥🔥 ❤️ 👨\u200d👩\u200d👧 family",
    "UPPER Case MiXeD",
    "aaaa aaaaa the then thee",
    "3.14159 1,000,000 ½ ②",
    # "!" is SD2's pad token, so CLIPTokenizer matches it as a special token inside the prompt.
    "hello!world! ! !!",
    # Control and format characters vanish in CLIPTokenizer's cleanup (without ftfy), joining their neighbours.
    "zero\u200bwidth soft\u00adhyphen nul\x00x \ufffd a\x0cb",
    # Python's lowercasing of a word-final sigma, and U+0345 that CLIPTokenizer's word pattern skips.
    "ΟΔΟΣ ΑΣ'Β Σ ʰΣ ΑΣ\u0345 Σ\u0345α a\u0345b",
    "Straße İstanbul ǅ",
    "a<|endoftext|>b <|ENDOFTEXT|> <|startoftext|>",
    "ｆｕｌｌｗｉｄｔｈ “curly” ﬁne",
    LONG,
]

# Merges for the synthetic vocabulary, in byte-level form: "Ã ©" is é (c3 a9), "ðŁĶ ¥" is 🔥, "ä½ ł" is 你.
MERGES = """
t h|th e</w>|h e|he l|hel l|hell o</w>|a n|an d</w>|i n|in g</w>|e r|e r</w>|o n</w>|a a|aa a</w>
c a|ca t</w>|o g</w>|d og</w>|' s</w>|o x</w>|f ox</w>|q u|qu i|qui c|quic k</w>|o r|or ld</w>|l d</w>|w or
u p|p p|pp er</w>|! !|Ã ©|Ã ©</w>|Ã ¨|ð Ł|ðŁ Ķ|ðŁĶ ¥</w>|ðŁĶ ¥|ä ½|ä½ ł</w>|å ¥|å¥ ½</w>|Î £
"""


def _write_configs(folder: Path, max_length: int = 77, **special: object) -> None:
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", **special}
    special = {k: v for k, v in special.items() if v is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def _write_bpe(folder: Path) -> None:
    """Byte-level vocabulary: every byte character with and without </w>, the merges' results, the specials."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [m.split() for m in MERGES.strip().replace("\n", "|").split("|")]
    tokens += [t for t in dict.fromkeys(a + b for a, b in merges) if t not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    _write_configs(folder, pad_token="!")


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    write_tokenizer(root / "tiny")
    _write_bpe(root / "bpe")
    return {"tiny": root / "tiny", "bpe": root / "bpe"}


def _reference(folder: Path):
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    if ref.fix_text is not None:
        pytest.skip("ftfy is installed: CLIPTokenizer then cleans prompts with ftfy, which ClipTokenizer does not do")
    return ref


def _expected(ref, prompts: list[str]) -> np.ndarray:
    out = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("name", ["tiny", "bpe"])
def test_ids_match_transformers(vocabs: dict[str, Path], name: str) -> None:
    ref = _reference(vocabs[name])
    tok = ClipTokenizer.load(vocabs[name])
    ids = tok.encode(PROMPTS)
    assert ids.dtype == np.int64
    assert ids.shape == (len(PROMPTS), 77) and tok.max_length == 77
    for prompt, got, want in zip(PROMPTS, ids, _expected(ref, PROMPTS), strict=True):
        assert got.tolist() == want.tolist(), f"{prompt!r}: {ref.convert_ids_to_tokens(got.tolist())}"


def test_merges_are_exercised(vocabs: dict[str, Path]) -> None:
    # Guards the synthetic vocabulary itself: merged tokens must show up, or the comparison above proves little.
    ref = _reference(vocabs["bpe"])
    tokens = ref.convert_ids_to_tokens(ClipTokenizer.load(vocabs["bpe"]).encode(PROMPTS[:8]).ravel().tolist())
    assert {"hello</w>", "the</w>", "Ã©</w>", "ä½ł</w>", "ðŁĶ¥</w>"} <= set(tokens)


def test_truncation_keeps_eos_and_warns(vocabs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    ref = _reference(vocabs["bpe"])
    tok = ClipTokenizer.load(vocabs["bpe"])
    dropped = len(ref(LONG).input_ids) - 77
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="runtime.tokenizer"):
        ids = tok.encode([LONG, "a short one"])
    assert ids[0, -1] == ref.eos_token_id and ids[1, -1] == ref.pad_token_id
    warnings = [r.getMessage() for r in caplog.records if r.name == "runtime.tokenizer"]
    assert len(warnings) == 1
    assert "CLIP can only handle sequences up to 77 tokens" in warnings[0]
    assert f"({dropped} tokens dropped)" in warnings[0] and "lazy dog" in warnings[0]


def test_tokenizer_json_gives_the_same_ids(vocabs: dict[str, Path], tmp_path: Path) -> None:
    ref = _reference(vocabs["bpe"])
    transformers.CLIPTokenizerFast.from_pretrained(vocabs["bpe"]).save_pretrained(tmp_path)
    # Without vocab.json and merges.txt only tokenizer.json can have been read.
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    assert (tmp_path / "tokenizer.json").is_file()
    ids = ClipTokenizer.load(tmp_path).encode(PROMPTS)
    np.testing.assert_array_equal(ids, _expected(ref, PROMPTS))


def test_files_saved_by_transformers(vocabs: dict[str, Path], tmp_path: Path) -> None:
    # The exporter saves with save_pretrained: special tokens then live in tokenizer_config's added_tokens_decoder.
    _reference(vocabs["bpe"]).save_pretrained(tmp_path)
    assert "added_tokens_decoder" in json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = ClipTokenizer.load(tmp_path).encode(PROMPTS)
    np.testing.assert_array_equal(ids, _expected(_reference(tmp_path), PROMPTS))


@pytest.mark.parametrize("fast", [False, True])
def test_added_tokens_keep_their_ids(vocabs: dict[str, Path], tmp_path: Path, fast: bool) -> None:
    # A textual-inversion word added after training: not in vocab.json, saved with its id (moved here to leave a gap,
    # so that the id must come from the files rather than from counting).
    cls = transformers.CLIPTokenizerFast if fast else transformers.CLIPTokenizer
    saved = cls.from_pretrained(vocabs["bpe"])
    saved.add_tokens(["<cat-toy>"])
    saved.save_pretrained(tmp_path)
    old_id, new_id = saved.convert_tokens_to_ids("<cat-toy>"), 600
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tmp_path / name).is_file():
            text = (tmp_path / name).read_text(encoding="utf-8")
            text = text.replace(f'"id": {old_id},', f'"id": {new_id},').replace(f'"{old_id}": {{', f'"{new_id}": {{')
            (tmp_path / name).write_text(text, encoding="utf-8")
    if fast:
        (tmp_path / "vocab.json").unlink()
        (tmp_path / "merges.txt").unlink()
    prompts = ["a <cat-toy> on the beach", "A <CAT-TOY>", "<cat-toy><cat-toy>!"]
    ref = _reference(vocabs["bpe"])
    ref.add_tokens(["<cat-toy>"])
    want = _expected(ref, prompts)
    want[want == old_id] = new_id
    if not fast:
        np.testing.assert_array_equal(_expected(_reference(tmp_path), prompts), want)
    ids = ClipTokenizer.load(tmp_path).encode(prompts)
    assert new_id in ids[0]
    np.testing.assert_array_equal(ids, want)


def _variant(source: Path, dest: Path, **configs: object) -> Path:
    shutil.copytree(source, dest)
    _write_configs(dest, **configs)
    return dest


@pytest.mark.parametrize(
    ("pad", "pad_token"),
    [
        ("!", "!"),
        ("<|endoftext|>", "<|endoftext|>"),
        ({"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}, "!"),
        (None, "<|endoftext|>"),  # no pad token in the files: eos pads
    ],
)
def test_pad_id_comes_from_the_files(vocabs: dict[str, Path], tmp_path: Path, pad: object, pad_token: str) -> None:
    folder = _variant(vocabs["bpe"], tmp_path / "tok", pad_token=pad)
    tok = ClipTokenizer.load(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert tok.pad_id == vocab[pad_token]
    ids = tok.encode(["a cat"])
    assert ids[0, -1] == vocab[pad_token]
    np.testing.assert_array_equal(ids, _expected(_reference(folder), ["a cat"]))


def test_special_tokens_as_dicts_and_max_length(vocabs: dict[str, Path], tmp_path: Path) -> None:
    # SD2's special_tokens_map.json writes bos/eos/unk as AddedToken dicts.
    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    eos = added("<|endoftext|>")
    folder = _variant(
        vocabs["bpe"], tmp_path / "tok", max_length=24, bos_token=added("<|startoftext|>"), eos_token=eos, unk_token=eos
    )
    tok = ClipTokenizer.load(folder)
    ids = tok.encode(PROMPTS)
    assert tok.max_length == 24 and ids.shape == (len(PROMPTS), 24)
    np.testing.assert_array_equal(ids, _expected(_reference(folder), PROMPTS))


def test_rejects_a_bare_string(vocabs: dict[str, Path]) -> None:
    with pytest.raises(TypeError):
        ClipTokenizer.load(vocabs["tiny"]).encode("a cat")  # type: ignore[arg-type]
    assert ClipTokenizer.load(vocabs["tiny"]).encode([]).shape == (0, 77)


def test_runtime_import_stays_torch_free() -> None:
    code = "import sys, runtime.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
