"""TextGenerator: prompts encoded with the tokenizer's BOS, padded on the left, only new tokens decoded.

The model folder is examples/generate.py's tiny random Llama (written with NumPy and safetensors, no
torch) with its byte-level BPE tokenizer, under which ``é`` and ``ö`` take two tokens each. The
references are the token-level ``model.generate`` of each prompt alone and, where installed,
transformers' tokenizer and ``generate`` on the same folder.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tp_gpu import TensorParallelConfig
from tp_gpu.errors import CheckpointError, ConfigError, ShapeError
from tp_gpu.models.st_files import MissingDependencyError
from tp_gpu.models.text_generation import REPLACEMENT_CHAR, TextGenerator

tokenizers = pytest.importorskip("tokenizers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"

#: Prompts of different lengths, with characters of two tokens.
PROMPTS = ["A man is", "Hi", "Héllo wörld, the cat sat on the windowsill", "Two dogs"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(example, tmp_path_factory):
    return example.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", use_transformers=False)


@pytest.fixture(scope="module")
def generator(folder):
    return TextGenerator.from_pretrained(
        folder, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
    )


def alone(generator, prompt, n, **kwargs):
    """The new token ids of ``prompt`` generated alone, with no padding, cut at the first eos."""
    ids = np.array([generator.tokenizer.encode(prompt).ids])  # (1, S)
    new = generator.model.generate(ids, max_new_tokens=n, **kwargs)[0, ids.shape[1] :].tolist()
    eos = kwargs.get("eos_token_id", 1)
    return new[: new.index(eos)] if eos in new else new


def test_the_tokenizer_splits_characters_and_adds_bos(generator):
    """The premises of the other tests: BOS first, and é of two tokens, the first alone undecodable."""
    encoding = generator.tokenizer.encode("é")
    assert encoding.ids[0] == 0 and len(encoding.ids) == 3
    assert generator.tokenizer.decode(encoding.ids[1:2]) == REPLACEMENT_CHAR


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_a_batch_gives_each_prompt_what_it_gives_alone(folder, make_config, n_workers):
    generator = TextGenerator.from_pretrained(folder, make_config(n_workers))
    texts = generator(PROMPTS, max_new_tokens=9)
    assert texts == [generator.decode(alone(generator, p, 9)) for p in PROMPTS]
    assert len(set(texts)) == len(texts) and all(texts)  # the rows differ: no row is another's copy
    assert generator(PROMPTS[2], max_new_tokens=9) == texts[2]  # a str gives a str


def test_left_padding_with_the_pad_id_and_a_mask(generator):
    ids, mask = generator.encode(["Hi", "A man is"])
    short, long = (generator.tokenizer.encode(p).ids for p in ("Hi", "A man is"))
    gap = len(long) - len(short)
    assert gap > 0 and ids.shape == mask.shape == (2, len(long))
    assert ids[0].tolist() == [generator.pad_token_id] * gap + short and ids[1].tolist() == long
    assert mask[0].tolist() == [0] * gap + [1] * len(short) and mask[1].tolist() == [1] * len(long)
    assert generator.pad_token_id == 1  # no pad token anywhere: the config's eos


def test_the_pad_id_comes_from_the_tokenizer_first_and_its_settings_are_ignored(generator, folder):
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=7, pad_token="x", length=30)
    tokenizer.enable_truncation(max_length=3)
    padded = TextGenerator(generator.model, tokenizer)
    assert padded.pad_token_id == 7
    assert tokenizer.padding["pad_id"] == 7 and tokenizer.truncation["max_length"] == 3  # left as given
    ids, mask = padded.encode(["Hi", PROMPTS[2]])
    assert ids[0, 0] == 7 and mask.sum(axis=1).tolist() == [
        len(padded.tokenizer.encode(p).ids) for p in ("Hi", PROMPTS[2])
    ]
    assert padded(PROMPTS, max_new_tokens=5) == generator(PROMPTS, max_new_tokens=5)


@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "temperature": 1.5, "top_k": 50, "seed": 3}])
def test_stream_joined_is_the_text_of_call(generator, settings):
    for prompt in PROMPTS:
        pieces = list(generator.stream(prompt, max_new_tokens=24, **settings))
        assert "".join(pieces) == generator(prompt, max_new_tokens=24, **settings)
        assert all(pieces) and not any(p.endswith(REPLACEMENT_CHAR) for p in pieces[:-1])


def test_stream_holds_back_a_character_until_its_last_token(generator, monkeypatch):
    text = "Hé wörld"
    script = generator.tokenizer.encode(text, add_special_tokens=False).ids + [1, 42]  # eos, then junk

    def scripted(ids, mask, **kwargs):
        assert ids.shape == (1, len(generator.tokenizer.encode("x").ids))
        yield from (np.array([t]) for t in script)

    monkeypatch.setattr(generator.model, "stream", scripted)
    pieces = list(generator.stream("x"))
    assert "".join(pieces) == text and REPLACEMENT_CHAR not in "".join(pieces)
    assert "é" in pieces[1] and len(pieces) >= 4  # pieces as the tokens came, each character whole


def test_only_new_tokens_are_decoded_special_tokens_skipped_and_cut_at_eos(generator, monkeypatch):
    hi = generator.tokenizer.encode("Hi").ids
    word = generator.tokenizer.encode(" the cat", add_special_tokens=False).ids
    new = word[:1] + [0] + word[1:] + [1] + word  # BOS (special) inside, then eos, then more

    def scripted(ids, mask, *, max_new_tokens, **kwargs):
        assert ids[0, -len(hi) :].tolist() == hi and kwargs["pad_token_id"] == generator.pad_token_id
        return np.concatenate([ids, np.tile(new, (ids.shape[0], 1))], axis=1)

    monkeypatch.setattr(generator.model, "generate", scripted)
    assert generator(["Hi", "A man"]) == [" the cat", " the cat"]
    assert generator("Hi", eos_token_id=[99, word[-1]]) == generator.decode(word[:1] + [0] + word[1:-1])


def test_a_given_eos_ends_each_row_where_it_first_comes(generator):
    full = alone(generator, PROMPTS[0], 12)
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])  # first time this token comes
    expected = generator.decode(full[:k])
    assert generator(PROMPTS[0], max_new_tokens=12, eos_token_id=full[k]) == expected
    assert "".join(generator.stream(PROMPTS[0], max_new_tokens=12, eos_token_id=full[k])) == expected


def test_model_kwargs_reach_the_model(folder, generator):
    padded = TextGenerator.from_pretrained(
        folder, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64"), pad_to_multiple_of=8
    )
    assert padded(PROMPTS, max_new_tokens=6) == generator(PROMPTS, max_new_tokens=6)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, named",
    [([], "[]"), (["a", 3], "prompts[1] must be a str, got int 3"), ([None], "got NoneType None"),
     (b"abc", "prompts[0] must be a str, got int 97"), (7, "got int 7")],
)  # fmt: skip
def test_bad_prompts_are_named_before_anything_runs(generator, monkeypatch, prompts, named):
    monkeypatch.setattr(generator.model, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        generator(prompts)


def test_stream_refuses_what_is_not_one_str_and_bad_settings_at_the_call(generator):
    with pytest.raises(ConfigError, match=r"prompt must be a str, got list \['a'\]"):
        generator.stream(["a"])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generator.stream("a", max_new_tokens=0)  # at the call, not at the first next()


def test_a_prompt_of_no_token_is_refused(generator, folder):
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.post_processor = None  # no BOS: "" encodes to nothing
    with pytest.raises(ShapeError, match=r"prompt 1 \(''\) encodes to no token"):
        TextGenerator(generator.model, tokenizer)(["a", ""])


def test_bad_model_or_tokenizer(generator, folder):
    with pytest.raises(ConfigError, match="model must be a DecoderForCausalLM.*got str"):
        TextGenerator("model", generator.tokenizer)
    with pytest.raises(ConfigError, match="tokenizer must be a tokenizers.Tokenizer, got dict"):
        TextGenerator(generator.model, {})
    bigger = tokenizers.Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    bigger.add_tokens(["<a>", "<b>"])
    with pytest.raises(ConfigError, match="402 tokens; expected at most the model's vocab_size 400"):
        TextGenerator(generator.model, bigger)


def test_folder_without_or_with_a_bad_tokenizer_json(tmp_path, folder):
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    with pytest.raises(
        CheckpointError, match=re.escape(f"{tmp_path}: tokenizer.json is missing") + ".*config.json"
    ):
        TextGenerator.from_pretrained(tmp_path)  # before model.safetensors is looked for
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer file"):
        TextGenerator.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        TextGenerator.from_pretrained(tmp_path / "absent")


def test_without_tokenizers_the_error_says_how_to_install_it(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tp_gpu\[models\]'"):
        TextGenerator.from_pretrained(folder)


# --- against transformers ----------------------------------------------------------------------------


def test_the_texts_of_transformers_tokenizer_and_generate(folder, generator):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(folder) / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = generator.encode(PROMPTS)
    assert np.array_equal(batch["input_ids"].numpy(), ids) and np.array_equal(
        batch["attention_mask"].numpy(), mask
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    eos = alone(generator, PROMPTS[1], 8)[3]  # a token that ends at least one row early
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=1)
    rows = [row.tolist() for row in out[:, ids.shape[1] :]]
    assert any(eos in row[:-1] for row in rows)
    theirs = tokenizer.batch_decode(
        [row[: row.index(eos)] if eos in row else row for row in rows], skip_special_tokens=True
    )
    assert generator(PROMPTS, max_new_tokens=8, eos_token_id=eos) == theirs
