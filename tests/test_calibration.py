"""Calibration sources -> texts -> token batches."""

import json

import pytest
import torch

from effir.calibration import (
    block_batches,
    load_texts,
    sample_texts,
    side_batches,
    strip_wiki_markup,
    token_blocks,
    wiki_articles,
    wiki_path,
)
from effir.utils import EffirError

WIKI = """{{Infobox city|name=Paris|note={{nested|x}}}}
'''Paris''' is the [[capital city|capital]] of [[France]].<ref name="a">Some citation {{cite web|url=x}}</ref> \
It lies on the [[Seine]] river.<ref name="b"/> See [http://example.org the site] for more.

[[File:Paris.jpg|thumb|The [[Eiffel Tower]] at night]]
{| class="wikitable"
|-
| a table cell || another {{flag|FR}}
|}
== History ==
* The city was founded by the [[Parisii]] tribe around the third century BC.<!-- hidden comment -->
[[Category:Capitals in Europe]]

== References ==
{{reflist}} everything after this is dropped
"""


def test_strip_wiki_markup():
    text = strip_wiki_markup(WIKI)
    assert text.split("\n\n") == [
        "Paris is the capital of France. It lies on the Seine river. See the site for more.",
        "The city was founded by the Parisii tribe around the third century BC.",
    ]


@pytest.fixture(scope="module")
def articles():
    try:
        wiki_path()
    except EffirError:
        pytest.skip("gensim wheel (built-in wiki text) not installed")
    return wiki_articles()


def test_builtin_wiki_is_clean_prose(articles):
    assert 95 <= len(articles) <= 115  # ~105 main-namespace articles, redirects skipped
    assert articles[0].startswith("Anarchism is a political philosophy")
    joined = "\n".join(articles)
    assert len(joined) > 1_000_000
    for markup in ("{{", "[[", "<ref", "{|", "'''", "&nbsp;", "==", "Category:"):
        assert joined.count(markup) < 20, markup  # a few leftovers from malformed wikitext are tolerable
    assert load_texts("wiki").documents == articles


def test_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond one\n\n   \n")
    t = load_texts(str(txt))
    assert t.documents == ["first paragraph\nstill first", "second one"] and t.queries is t.documents
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"title": "T", "text": "c"}) + "\n")
    assert load_texts(str(jl)).documents == ["a b", "T c"]


def test_beir_sources(tiny_beir):
    both = load_texts(f"beir:{tiny_beir}")
    assert len(both.queries) == 3 and len(both.documents) == 6
    assert both.for_side("query")[0] == "what is the capital of france"
    assert both.for_side("document")[0] == "paris paris is the capital of france"  # title + " " + text
    assert load_texts(str(tiny_beir)).queries == both.queries  # a bare BEIR folder path works too
    assert load_texts(f"beir:{tiny_beir}:both").documents == both.documents
    q = load_texts(f"beir:{tiny_beir}:queries")
    assert q.queries == q.documents == both.queries
    c = load_texts(f"beir:{tiny_beir}:corpus")
    assert c.queries == c.documents == both.documents


@pytest.mark.parametrize("source, match", [
    ("c4", "unknown calibration source"),
    ("missing.txt", "does not exist"),
    ("./nope/data.jsonl", "does not exist"),
    ("beir:/no/such/dir", "does not exist"),
])
def test_bad_sources(source, match):
    with pytest.raises(EffirError, match=match):
        load_texts(source)


def test_bad_files(tmp_path, tiny_beir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(EffirError, match="contains no text"):
        load_texts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(EffirError, match="line 2 has no 'text'"):
        load_texts(str(bad))
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EffirError, match=":2: not valid JSON"):
        load_texts(str(bad))
    with pytest.raises(EffirError, match="unknown BEIR part"):
        load_texts(f"beir:{tiny_beir}:qrels")
    (tiny_beir / "queries.jsonl").unlink()
    with pytest.raises(EffirError, match="queries.jsonl"):
        load_texts(f"beir:{tiny_beir}")
    assert len(load_texts(f"beir:{tiny_beir}:corpus").documents) == 6  # the corpus alone still works


def test_sample_texts_is_seeded_and_ordered():
    texts = [f"t{i}" for i in range(50)]
    a = sample_texts(texts, 10, seed=1)
    assert a == sample_texts(texts, 10, seed=1) and a != sample_texts(texts, 10, seed=2)
    assert len(a) == 10 and a == sorted(a, key=texts.index)
    assert sample_texts(texts, 99) == texts


def test_token_blocks(tiny_tokenizer):
    texts = ["the cat is blue"] * 10 + ["a dog"] * 10  # 4 and 2 word-level tokens, joined by nothing ("\n\n" -> [])
    blocks = token_blocks(tiny_tokenizer, texts, samples=3, seq_len=5, seed=0)
    assert len(blocks) == 3 and all(len(b) == 5 for b in blocks)
    assert all(t not in (0, 1, 2) for b in blocks for t in b)  # no pad/BOS/EOS: raw text windows
    many = token_blocks(tiny_tokenizer, texts, samples=100, seq_len=5)
    assert len(many) == 60 // 5  # only full blocks: 60 tokens in all
    assert token_blocks(tiny_tokenizer, texts, samples=3, seq_len=5, seed=0) == blocks  # deterministic
    short = token_blocks(tiny_tokenizer, ["a dog"], samples=4, seq_len=50)
    assert short == [tiny_tokenizer("a dog", add_special_tokens=False)["input_ids"]]  # one shorter block
    batches = list(block_batches(short + blocks[:2], batch_size=2, pad_id=0))
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 5]), torch.Size([1, 5])]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_side_batches_encode_like_retrieval(tiny_llama_dir):
    import effir

    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="e5")
    texts = ["fish", "the river in the city is blue water", "a cat"]
    batches = list(side_batches(enc, texts, "query", batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    expected = enc.tokenize(sorted(texts, key=len, reverse=True)[:2], "query")
    assert torch.equal(batches[0]["input_ids"], expected["input_ids"])
    ids = batches[1]["input_ids"][0].tolist()
    assert ids[-1] == enc.tokenizer.eos_token_id and len(ids) > 3  # prompt tokens + "fish" + EOS
