"""labkit.exercises.lab04: each check passes a right answer (printing one ✓ line), explains typical
wrong answers, and reports a stub as "not implemented yet"."""
from __future__ import annotations

import pytest
from checks import one_check_line, stub
from labcells import LABS, assert_hidden_check_earns_its_place

from labkit.exercises import lab04 as exercises


# --------------------------------------------------------------------------- tokens
def _tokens(image_size, downsample):
    tokens = (image_size // downsample) ** 2
    return tokens, (image_size * image_size) ** 2 // tokens ** 2


def test_token_count(capsys):
    exercises.check_token_count(_tokens)
    assert "256× smaller attention" in one_check_line(capsys)
    with pytest.raises(AssertionError, match="square it"):   # the sequence ratio, not the attention ratio
        exercises.check_token_count(lambda s, d: ((s // d) ** 2, d * d))
    with pytest.raises(AssertionError, match="tokens, expected"):
        exercises.check_token_count(lambda s, d: (s // d, d ** 4))
    with pytest.raises(AssertionError, match="two integers"):
        exercises.check_token_count(lambda s, d: None)
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_token_count(stub)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- pre-LN block
def _prenorm(x, block):
    x = x + block.attn(block.norm1(x))
    return x + block.mlp(block.norm2(x))


def test_prenorm_block(capsys):
    exercises.check_prenorm_block(_prenorm)
    assert "pre-LN block" in one_check_line(capsys)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, b: b(x), "write the forward pass yourself"),                       # the block under test
    (lambda x, b: b.norm2(b.norm1(x + b.attn(x)) + b.mlp(b.norm1(x + b.attn(x)))), "post-LN"),
    (lambda x, b: b.norm2(b.norm1(x + b.attn(x)) + b.mlp(b.norm1(x + b.attn(x)))) * 1.0, "post-LN"),
    (lambda x, b: (lambda a: a + b.mlp(b.norm1(a)))(x + b.attn(b.norm1(x))), "differs from a pre-LN"),  # norm1 twice
    (lambda x, b: (lambda a: a + b.mlp(b.norm2(a)))(b.attn(b.norm1(x))), "differs from a pre-LN"),    # no residual
    (lambda x, b: b.norm1(x) + b.attn(b.norm1(x)) + b.mlp(b.norm2(x)), "differs from a pre-LN"),      # normed residual
    (lambda x, b: x[:, 0], "shaped like x"),
])
def test_prenorm_block_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        exercises.check_prenorm_block(wrong)


def test_prenorm_blockstub():
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_prenorm_block(stub)


def test_prenorm_reference_matches_the_vit_block():
    """The check's independent reference and labkit's Block agree (so a right answer passes)."""
    import torch

    from labkit.models.vit import Block

    torch.manual_seed(1)
    block = Block(dim=16, heads=4, mlp_dim=32).eval()
    x = torch.randn(3, 7, 16)
    a = x + exercises._reference_attention(block.attn, exercises._layer_norm(block.norm1, x))
    want = a + exercises._reference_mlp(block.mlp, exercises._layer_norm(block.norm2, a))
    assert torch.allclose(block(x), want, atol=1e-5)


# --------------------------------------------------------------------------- kept checkpoints
def _kept(val_losses, num_to_keep):
    best = sorted(range(1, len(val_losses) + 1), key=lambda e: val_losses[e - 1])[:num_to_keep]
    return sorted(set(best) | {len(val_losses)})


def test_kept_checkpoints(capsys):
    exercises.check_kept_checkpoints(_kept)
    assert "kept checkpoints" in one_check_line(capsys)


@pytest.mark.parametrize("wrong, message", [
    (lambda v, k: sorted(sorted(range(1, len(v) + 1), key=lambda e: v[e - 1])[:k]), "latest checkpoint"),
    (lambda v, k: [e - 1 for e in _kept(v, k)], "count epochs from 1"),
    (lambda v, k: list(range(max(1, len(v) - k + 1), len(v) + 1)), "ranks checkpoints by val_loss"),
    (lambda v, k: sorted(set(sorted(range(1, len(v) + 1), key=lambda e: -v[e - 1])[:k]) | {len(v)}), "lowest"),
    (lambda v, k: "3", "epoch numbers"),
])
def test_kept_checkpoints_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        exercises.check_kept_checkpoints(wrong)


def test_kept_checkpointsstub():
    with pytest.raises(AssertionError, match="not implemented yet"):
        exercises.check_kept_checkpoints(stub)


def test_replay_matches_rays_own_rule_on_examples():
    assert exercises.replay_checkpoint_manager([1.9, 1.5, 1.2, 1.0, 0.9], 3) == [3, 4, 5]
    assert exercises.replay_checkpoint_manager([1.2, 0.8, 0.9, 1.1, 0.85, 1.0], 3) == [2, 3, 5, 6]
    assert exercises.replay_checkpoint_manager([0.5, 0.6], 3) == [1, 2]


# --------------------------------------------------------------------------- hidden checks (labkit grade)
LAB = next(p for p in LABS if p.name.startswith("04_"))
SOLUTION = {'token_count': ['my_token_count'], 'prenorm_block': ['my_prenorm_block'], 'kept_checkpoints': ['my_kept_epochs']}
#: For each question, a plausible wrong answer that its public check lets through.
WRONG = {
    "token_count": """
def my_token_count(image_size, downsample):
    tokens = image_size * image_size // downsample ** 2       # pixels / patch area: right only when sides divide
    return tokens, downsample ** 4
""",
    "prenorm_block": """
def my_prenorm_block(x, block):
    with torch.no_grad():                                     # "it is only a forward pass"
        x = x + block.attn(block.norm1(x))
        return x + block.mlp(block.norm2(x))
""",
    "kept_checkpoints": """
def my_kept_epochs(val_losses, num_to_keep):
    best = [val_losses.index(v) + 1 for v in sorted(val_losses)[:num_to_keep]]   # a repeated loss maps to one epoch
    return sorted(set(best) | {len(val_losses)})
""",
}


@pytest.mark.parametrize("question", sorted(SOLUTION))
def test_hidden_checks_pass_the_solution_and_fail_a_wrong_answer_the_public_check_misses(question):
    assert_hidden_check_earns_its_place(LAB, question, SOLUTION[question], WRONG[question])


def test_the_run_uses_the_students_rule_or_the_reference_while_it_is_a_stub(capsys):
    mine = lambda losses, keep: [len(losses)]  # noqa: E731  (wrong, but the student's: the run applies it)
    assert exercises.kept_epochs_for_run(mine) is mine
    assert exercises.kept_epochs_for_run(stub) is exercises.replay_checkpoint_manager
    assert "my_kept_epochs (exercise 3) is not implemented yet" in capsys.readouterr().out
