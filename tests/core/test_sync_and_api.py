"""No host sync with validate=False, and the public API (importable, documented with equations).

On CPU a host sync cannot be observed directly, so every Python-level way of reading tensor
values on the host is made to raise while the loss runs (forward and backward). A positive
control checks that the same trap does catch the (single, intended) sync of validate=True.
On CUDA, torch.cuda.set_sync_debug_mode("error") turns any synchronising op into an error.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator

import pytest
import torch
from conftest import KL_ESTIMATORS, NORMALIZES, OBJECTIVES, SCORES, Batch, random_batch

import discoloss
from discoloss import disco_loss


class HostSync(AssertionError):
    pass


TRAPPED = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "unique",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def trap(name: str):
        def raiser(*args, **kwargs):
            raise HostSync(f"torch.Tensor.{name} called in the loss path")

        return raiser

    with monkeypatch.context() as m:
        for name in TRAPPED:
            m.setattr(torch.Tensor, name, trap(name))
        for name in ("nonzero", "unique", "unique_consecutive", "masked_select", "argwhere"):
            m.setattr(torch, name, trap(f"torch.{name}"))
        yield


OPTIONS = list(itertools.product(SCORES, OBJECTIVES, KL_ESTIMATORS, NORMALIZES))


@pytest.mark.parametrize("score,objective,kl_estimator,normalize", OPTIONS)
def test_validate_false_reads_nothing_on_the_host(
    monkeypatch, score, objective, kl_estimator, normalize
):
    batch = random_batch(71, shift=0.05)
    lp = batch.log_probs.clone().requires_grad_(True)
    opts = {
        "score": score,
        "objective": objective,
        "kl_estimator": kl_estimator,
        "normalize": normalize,
        "delta": 1e-3,
        "beta": 10.0,
    }
    with no_host_reads(monkeypatch):
        out = disco_loss(lp, *batch.args()[1:], validate=False, **opts)
        out.loss.backward()
    # the trapped run computed the same thing as a normal one
    lp2 = batch.log_probs.clone().requires_grad_(True)
    ref = disco_loss(lp2, *batch.args()[1:], **opts)
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(lp.grad, lp2.grad)


def test_the_trap_catches_the_validation_sync(monkeypatch):
    """Positive control: validate=True reads one flag vector on the host, which the trap sees."""
    batch = random_batch(72)
    with no_host_reads(monkeypatch), pytest.raises(HostSync):
        disco_loss(*batch.args(), validate=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
def test_validate_false_is_sync_free_on_cuda():
    batch = random_batch(73, shift=0.05)
    cuda = Batch(*(t.cuda() for t in batch.args()))
    for score, objective, kl_estimator, normalize in OPTIONS:
        opts = {
            "score": score,
            "objective": objective,
            "kl_estimator": kl_estimator,
            "normalize": normalize,
            "delta": 1e-3,
            "beta": 10.0,
        }
        lp = cuda.log_probs.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = disco_loss(lp, *cuda.args()[1:], validate=False, **opts)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = disco_loss(*batch.args(), **opts)
        torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- public API

#: Each public name and fragments of its equation that its docstring must contain (compared
#: with all whitespace removed).
EQUATIONS = {
    "disco_loss": [
        r"-J(\theta)",
        r"\frac{\beta}{2}",
        r"-\delta\big]_+^2",
        r"J_q=\sum_{i\inP_q}v_i\,s_i",
        r"v_i=\frac{e^{\mathrm{pref}_i/\lambda}}{\sum_{k\inP_q}e^{\mathrm{pref}_k/\lambda}}",
        "arXiv2510.04474",
    ],
    "DiscoOutput": ["-objective+penalty", "beta/2*max(kl-delta,0)^2"],
    "sequence_scores": [r"\frac{1}{|o|}\sum_t\log\pi_\theta", r"\frac{\pi_\theta(o_t"],
    "kl_divergence": [r"k_1(x)=-x", r"k_3(x)=e^{x}-1-x", r"\sum_{i,t}m_{it}"],
    "squared_hinge_penalty": [r"\frac{\beta}{2}\,[\mathrm{KL}-\delta]_+^2"],
    "discriminative_objective": [
        r"\tau\log\frac{1}{|N_q|}\sum_{j\inN_q}e^{s_j/\tau}",
        r"\frac{1}{|P_q|}\sum_{i\inP_q}s_i",
        r"\frac{1}{G}\sum_q",
    ],
    "discriminative_weights": [
        r"w=\partialJ/\partials",
        r"\frac{1}{|P_q|\,G}",
        r"\frac{e^{s_j/\tau}}{\sum_{k\inN_q}e^{s_k/\tau}}",
        r"\frac{1}{|N_q|\,G}",
    ],
}


@pytest.mark.parametrize("name", sorted(EQUATIONS))
def test_public_name_is_importable_and_documents_its_equation(name):
    assert name in discoloss.__all__
    obj = getattr(discoloss, name)
    doc = obj.__doc__
    assert doc, f"{name} has no docstring"
    flat = re.sub(r"\s+", "", doc)
    for fragment in EQUATIONS[name]:
        assert re.sub(r"\s+", "", fragment) in flat, f"{name} docstring lacks {fragment!r}"


def test_all_lists_exactly_the_documented_names():
    missing = set(EQUATIONS) - set(discoloss.__all__)
    assert not missing
    for name in discoloss.__all__:
        assert getattr(discoloss, name).__doc__, name


def test_disco_output_fields():
    fields = discoloss.DiscoOutput._fields
    assert fields[:5] == ("loss", "objective", "kl", "penalty", "metrics")
