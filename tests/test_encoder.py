import pytest
import torch

import effir
from effir.encoder import EmbeddingSettings, pool, prompt_template
from effir.utils import EffirError

TEXTS = ["what is the capital of france", "fish", "the river in the city is blue water and a fish is in it"]


def test_last_token_identical_under_left_and_right_padding(tiny_model_dir):
    right = effir.load(tiny_model_dir, device="cpu", dtype="fp32", padding_side="right")
    left = effir.load(tiny_model_dir, device="cpu", dtype="fp32", padding_side="left")
    for side in ("query", "document"):
        a, b = right.encode(TEXTS, side, batch_size=3), left.encode(TEXTS, side, batch_size=3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # and a batch of one (no padding at all) agrees with the padded batch
        single = torch.cat([right.encode([t], side) for t in TEXTS])
        torch.testing.assert_close(a, single, atol=1e-5, rtol=1e-5)


def test_eos_appended_and_last_token_pooled(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    batch = enc.tokenize(["fish", "the river"], "document")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert [ids[i, lengths[i] - 1].item() for i in range(2)] == [enc.tokenizer.eos_token_id] * 2
    hidden = enc.model(**batch).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[torch.arange(2), lengths - 1], dim=-1)
    torch.testing.assert_close(enc.embed(**batch), expected)


def test_prompt_reaches_queries_only_by_default(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    assert enc.format(["fish"], "query") == [prompt_template("effir").replace("{text}", "fish")]
    assert enc.format(["fish"], "document") == ["fish"]
    assert enc.format([{"title": "t", "text": "x"}], "document") == ["t x"]
    # the prompt changes the query embedding, so it really reaches the model
    q, d = enc.encode(["fish"], "query"), enc.encode(["fish"], "document")
    assert not torch.allclose(q, d)


def test_prompt_presets_and_overrides(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="e5", task="Find cats.")
    assert enc.format(["x"], "query") == ["Instruct: Find cats.\nQuery: x"]
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_prompt="none", pooling="mean")
    assert enc.format(["x"], "query") == ["x"] and enc.settings.pooling == "mean"
    with pytest.raises(EffirError, match="neither a preset"):
        effir.load(tiny_llama_dir, device="cpu", query_prompt="bogus")


def test_max_lengths_are_separate(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32", query_max_length=4, document_max_length=6,
                     query_prompt="none")
    long = " ".join(["fish"] * 20)
    assert enc.tokenize([long], "query")["input_ids"].shape[1] == 4
    assert enc.tokenize([long], "document")["input_ids"].shape[1] == 6


def test_pool_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(hidden, right, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, left, "last").tolist() == [[4.0, 5.0], [10.0, 11.0]]
    assert pool(hidden, right, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert pool(hidden, left, "cls").tolist() == [[2.0, 3.0], [6.0, 7.0]]


def test_encode_restores_input_order(tiny_llama_dir):
    enc = effir.load(tiny_llama_dir, device="cpu", dtype="fp32")
    together = enc.encode(TEXTS, "document", batch_size=2)
    for i, t in enumerate(TEXTS):
        torch.testing.assert_close(together[i], enc.encode([t], "document")[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(len(TEXTS)))


def test_every_architecture_embeds(tiny_model_dir):
    enc = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    emb = enc.encode_queries(TEXTS)
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()
    assert enc.settings.pooling == ("mean" if enc.adapter.family == "bert" else "last")


def test_bad_settings():
    with pytest.raises(EffirError, match="pooling"):
        EmbeddingSettings(pooling="max")
    with pytest.raises(EffirError, match="unknown embedding setting"):
        EmbeddingSettings.from_dict({"poolng": "last"})
