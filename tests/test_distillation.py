"""The block-output term of label-free distillation on every architecture of the table: which states it compares,
zero for a student equal to its parent (LoRA at its start), and gradients into the student only."""

import torch

import effir
from effir import training
from effir.arch import layer_list
from effir.distillation import block_outputs, student_pass


def _batch(enc):
    return enc.tokenize(["the cat and the dog in the city", "a gene"], "document")  # padded: lengths differ


def test_block_outputs_are_the_residual_stream_after_each_block(tiny_model_dir):
    enc = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    batch = _batch(enc)
    with torch.no_grad(), block_outputs(layer_list(enc.model, enc.adapter)) as states:
        out = enc.model(**batch)
    assert len(states) == enc.model.config.num_hidden_layers
    assert all(s.shape == (2, batch["input_ids"].shape[1], enc.dim) for s in states)
    # decoders: the last block's output is compared before the final norm; BERT (post-norm) has no final norm
    assert torch.equal(states[-1], out.last_hidden_state) == (not enc.adapter.is_decoder)
    with torch.no_grad():
        enc.model(**batch)
    assert len(states) == enc.model.config.num_hidden_layers  # the hooks are gone after the block


def test_a_student_equal_to_its_parent_has_zero_hidden_loss(tiny_model_dir):
    acc = training.accelerator("cpu", "fp32")
    parent = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    student = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    training.add_lora(student, r=4, alpha=8)
    student.model.eval()  # BERT's dropout would make the two passes differ
    for kind in ("cosine", "nmse"):
        emb, hidden = student_pass(acc, student, parent, kind)(_batch(student))
        assert hidden.item() == 0.0 and torch.equal(emb, parent.embed(**_batch(parent)))


def test_the_hidden_loss_trains_the_student_and_never_the_parent(tiny_model_dir):
    acc = training.accelerator("cpu", "fp32")
    parent = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    student = effir.load(tiny_model_dir, device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.model.eval()
    _, hidden = student_pass(acc, student, parent, "cosine")(_batch(student))
    hidden.backward()
    assert hidden.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.parameters())
    assert all(p.grad is None for p in parent.model.parameters())
