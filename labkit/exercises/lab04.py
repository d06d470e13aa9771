"""Exercise checks for Lab 04 (the ViT, Lightning on Ray Train): tokens and attention cost, a
pre-LN block, and which checkpoints Ray keeps.

Each reference is independent of the code under test: the token count comes from running a
pooling layer over a real image, the pre-LN block is recomputed with ``torch.nn.functional``
from the block's weights (and the block handed to the student cannot run itself), and the kept
checkpoints come from replaying Ray's bookkeeping report by report.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from labkit.exercises import answer_or_reference, call_student, ok
from labkit.models.vit import Block


# --------------------------------------------------------------------------- 1. tokens and attention cost
def _reference_tokens(image_size: int, downsample: int) -> tuple[int, int]:
    """Count the grid positions a ``downsample``× stride leaves by running a pooling layer, then
    compare the attention matrices ((tokens)² entries against (pixels)²)."""
    grid = F.avg_pool2d(torch.zeros(1, 1, image_size, image_size), downsample)
    tokens = grid.numel()
    return tokens, round((image_size * image_size) ** 2 / tokens ** 2)


def check_token_count(fn: Callable[[int, int], tuple[int, int]]) -> None:
    """Check ``fn(image_size, downsample) -> (tokens, attention_ratio)``: the tokens a stem that
    shrinks each side ``downsample``× makes from an ``image_size²`` image ([CLS] left out), and how
    many times smaller the attention matrix is than with one token per pixel."""
    for size, d in ((32, 4), (128, 4), (224, 4), (64, 2), (96, 8)):
        got = call_student(fn, size, d, what="the token-count exercise")
        want = _reference_tokens(size, d)
        try:
            got = tuple(int(v) for v in got)
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"fn({size}, {d}) returned {got!r}; return two integers (tokens, ratio).") from exc
        if got[0] != want[0]:
            raise AssertionError(f"fn({size}, {d}) gives {got[0]} tokens, expected {want[0]}: the stem leaves an "
                                 f"(image_size/downsample) × (image_size/downsample) grid, one token per position.")
        if got[1] != want[1]:
            hint = (" — that is the sequence ratio; the attention matrix is tokens × tokens, so square it"
                    if got[1] == d * d else "")
            raise AssertionError(f"fn({size}, {d}) gives an attention ratio of {got[1]}, expected {want[1]}{hint}: "
                                 f"attention grows with the square of the token count, so it shrinks by "
                                 f"(downsample²)² = downsample⁴.")
    ok("token count and attention cost are right: a 4× stem gives 16× fewer tokens, 256× smaller attention")


# --------------------------------------------------------------------------- 2. a pre-LN block
class BlockParts(nn.Module):
    """A block's parts (``norm1``, ``attn``, ``norm2``, ``mlp``) without a forward of its own, so an
    answer must compose them: ``block(x)`` raises."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("block(x) runs the finished block; write the forward pass yourself from "
                             "block.norm1, block.attn, block.norm2 and block.mlp.")


def _reference_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out from the layer's weights (softmax(QKᵀ/√d)·V)."""
    b, n, dim = x.shape
    h = attn.heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, h, dim // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // h), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(b, n, dim), attn.proj.weight, attn.proj.bias)


def _reference_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    first, last = mlp[0], mlp[3]
    return F.linear(F.gelu(F.linear(x, first.weight, first.bias)), last.weight, last.bias)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def check_prenorm_block(fn: Callable[[torch.Tensor, nn.Module], torch.Tensor]) -> None:
    """Check ``fn(x, block) -> y``: the pre-LayerNorm residual block written with the parts of a
    block (``norm1``, ``attn``, ``norm2``, ``mlp``), against the same block recomputed from its
    weights with ``torch.nn.functional``."""
    torch.manual_seed(0)
    block = Block(dim=16, heads=4, mlp_dim=32).eval()
    with torch.no_grad():   # non-trivial norms: a missing or swapped LayerNorm changes the answer
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    parts = BlockParts(block).eval()
    x = torch.randn(2, 5, 16) * 3 + 1
    with torch.no_grad():
        got = call_student(fn, x, parts, what="the pre-LN block exercise")
        a = x + _reference_attention(block.attn, _layer_norm(block.norm1, x))
        want = a + _reference_mlp(block.mlp, _layer_norm(block.norm2, a))
        p = _layer_norm(block.norm1, x + _reference_attention(block.attn, x))
        post = _layer_norm(block.norm2, p + _reference_mlp(block.mlp, p))
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        raise AssertionError(f"fn returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))}; return a tensor "
                             f"shaped like x {tuple(x.shape)}.")
    if torch.allclose(got, post, atol=1e-4):
        raise AssertionError("that is the post-LN block of the original Transformer (normalise after adding); "
                             "pre-LN normalises the input of each sub-layer: x + attn(norm1(x)).")
    if not torch.allclose(got, want, atol=1e-4):
        raise AssertionError("the output differs from a pre-LN block: first x = x + block.attn(block.norm1(x)), then "
                             "x = x + block.mlp(block.norm2(x)) — each sub-layer reads the normalised x and adds to "
                             "the un-normalised residual; return x.")
    ok("pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)) — the residual path stays an identity")


# --------------------------------------------------------------------------- 3. which checkpoints Ray keeps
def replay_checkpoint_manager(val_losses: Sequence[float], num_to_keep: int) -> list[int]:
    """The epochs (1-based) whose checkpoints are on disk after training, found by replaying Ray
    Train's bookkeeping one report at a time: after each report the checkpoints are ranked by
    ``val_loss`` (lower is better) and all but the best ``num_to_keep`` are deleted — except the
    latest one, which Ray keeps until the next report (a run must be able to resume from it)."""
    on_disk: list[int] = []
    for epoch, _ in enumerate(val_losses, start=1):
        on_disk.append(epoch)
        ranked = sorted(on_disk, key=lambda e: (val_losses[e - 1], e))
        on_disk = [e for e in on_disk if e in ranked[:num_to_keep] or e == epoch]
    return sorted(on_disk)


def check_kept_checkpoints(fn: Callable[[Sequence[float], int], Sequence[int]]) -> None:
    """Check ``fn(val_losses, num_to_keep) -> epochs``: the epochs (1-based, sorted) whose checkpoints
    remain after training with ``CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss",
    checkpoint_score_order="min")``."""
    cases = [([1.9, 1.5, 1.2, 1.0, 0.9], 3),           # improving: the last three
             ([1.2, 0.8, 0.9, 1.1, 0.85, 1.0], 3),     # best in the middle, last epoch not among the best
             ([2.0, 1.0, 1.5, 0.5, 0.7, 0.6, 0.9], 2),
             ([0.5, 0.6], 3),                          # fewer epochs than num_to_keep: all
             ([1.0, 0.9, 0.95, 0.8, 1.3], 1)]
    for losses, keep in cases:
        got = call_student(fn, list(losses), keep, what="the kept-checkpoints exercise")
        want = replay_checkpoint_manager(losses, keep)
        try:
            if isinstance(got, (str, bytes)):
                raise TypeError("a string")
            got = sorted(int(e) for e in got)
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"fn({losses}, {keep}) returned {got!r}; return a list of epoch numbers.") from exc
        if got == want:
            continue
        lowest = sorted(range(1, len(losses) + 1), key=lambda e: losses[e - 1])[:keep]
        if got == sorted(lowest):
            hint = ("those are the lowest val_loss epochs, but Ray never deletes the latest checkpoint (training "
                    "could resume from it), so the last epoch stays on disk too")
        elif got == [e - 1 for e in want] or got == sorted(e - 1 for e in lowest):
            hint = "count epochs from 1, not 0"
        elif got == list(range(max(1, len(losses) - keep + 1), len(losses) + 1)):
            hint = "those are the last epochs; with a score attribute Ray ranks checkpoints by val_loss"
        else:
            hint = "keep the num_to_keep lowest val_loss epochs, plus the latest one"
        raise AssertionError(f"fn({losses}, {keep}) returned {got}, expected {want}: {hint}.")
    ok("kept checkpoints: the num_to_keep lowest val_loss epochs, plus the latest, as Ray's bookkeeping does")


def kept_epochs_for_run(fn: Callable[[Sequence[float], int], Sequence[int]]) -> Callable:
    """The rule Lab 04 applies to its run: the student's ``fn(val_losses, num_to_keep)``, or, while the exercise is the
    untouched stub, the replay of Ray's bookkeeping (with a notice), so a student copy runs to the end."""
    return answer_or_reference(fn, replay_checkpoint_manager, ([1.0, 0.5], 1), what="my_kept_epochs (exercise 3)")
