"""The pure step math, against closed-form answers (no ComfyUI model involved)."""
import pytest
import torch

from inversion_chain.samplers import ddim

pytestmark = pytest.mark.fast


def linear_eps(matrix):
    """eps(x, sigma) = M x / (1 + sigma): linear, so the exact inverse step has a closed form."""
    return lambda x, sigma: (x @ matrix.T) / (1.0 + sigma)


def test_refined_step_is_the_exact_inverse_of_the_forward_step():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=gen) * 0.2
    eps = linear_eps(m)
    x_lo = torch.randn(3, 8, generator=gen, dtype=torch.float64).float()
    s_lo, s_hi = 0.5, 1.2
    # closed form: x_hi = (I - ds/(1+s_hi) M)^-1 x_lo
    ds = s_hi - s_lo
    exact = torch.linalg.solve(torch.eye(8) - ds / (1 + s_hi) * m, x_lo.T).T
    step = ddim.invert_step(eps, x_lo, s_lo, s_hi, refine_iters=30)
    assert torch.allclose(step.x_hi, exact, atol=1e-5)
    # and the forward DDIM step brings it back
    back = ddim.ddim_step(step.x_hi, eps(step.x_hi, s_hi), s_hi, s_lo)
    assert torch.allclose(back, x_lo, atol=1e-5)
    assert step.calls <= 31 and float(step.residual.max()) == 0.0  # stops once exact (tolerance 0)


def test_naive_step_feeds_the_lower_latent_to_the_model_at_the_higher_sigma():
    """The model's input is z = x / sqrt(1 + sigma^2); the naive step keeps it at z_lo (diffusers' choice)."""
    seen = []

    def eps(x, sigma):
        seen.append((x.clone(), sigma))
        return torch.ones_like(x)

    x_lo = torch.full((1, 2), 3.0)
    step = ddim.invert_step(eps, x_lo, 1.0, 2.0, refine_iters=0)
    (x_in, sigma_in), = seen
    assert sigma_in == 2.0
    assert torch.allclose(ddim.z_from_x(x_in, 2.0), ddim.z_from_x(x_lo, 1.0))
    assert torch.equal(step.x_hi, torch.full((1, 2), 4.0))
    assert step.residual is None and step.calls == 1


def test_residual_decreases_with_refinement_and_bounds_the_true_error():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=gen) * 0.3
    eps = linear_eps(m)
    x_lo = torch.randn(2, 6, generator=gen)
    previous = None
    for iters in (1, 2, 4, 8):
        step = ddim.invert_step(eps, x_lo, 1.0, 2.0, refine_iters=iters)
        true_residual = (x_lo + 1.0 * eps(step.x_hi, 2.0) - step.x_hi).abs().amax(1)
        assert torch.all(true_residual <= step.residual + 1e-7)
        if previous is not None:
            assert torch.all(step.residual < previous)
        previous = step.residual


def test_chain_has_one_latent_per_sigma_and_counts_calls():
    eps = lambda x, s: torch.zeros_like(x)  # noqa: E731
    chain, residuals, calls = ddim.invert_chain(eps, torch.ones(1, 3), [0.0, 1.0, 2.0, 5.0], refine_iters=2)
    # step 1: the naive guess (rescaled input) is off, one more evaluation is exact; later steps start from the
    # solved noise (zero) and are exact at their first evaluation
    assert len(chain) == 4 and len(residuals) == 3 and calls == [2, 1, 1]
    assert all(torch.equal(c, torch.ones(1, 3)) for c in chain)


def test_tolerance_stops_early_and_the_residual_is_the_true_round_trip_error_of_the_previous_iterate():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.3
    eps = linear_eps(m)
    x_lo = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    sigmas = [0.0, 0.3, 0.7, 1.2, 2.0, 3.5]
    tight, _, calls_tight = ddim.invert_chain(eps, x_lo, sigmas, refine_iters=20, tolerance=0.0)
    loose, residuals, calls = ddim.invert_chain(eps, x_lo, sigmas, refine_iters=20, tolerance=1e-4)
    assert sum(calls) < sum(calls_tight) and max(calls) <= 21
    assert all(float(r.max()) <= 1e-4 for r in residuals)
    # every loose step, sampled forward, lands within the tolerance of the latent it came from
    for k in range(len(sigmas) - 1):
        back = ddim.ddim_step(loose[k + 1], eps(loose[k + 1], sigmas[k + 1]), sigmas[k + 1], sigmas[k])
        assert float((back - loose[k]).abs().max()) <= 1e-4


def test_extrapolated_first_guess_costs_fewer_evaluations_than_the_naive_one():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64) * 0.3
    eps = linear_eps(m)
    x_lo = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    sigmas = [0.0] + [0.1 * 1.25 ** k for k in range(20)]
    spent = {g: sum(ddim.invert_chain(eps, x_lo, sigmas, refine_iters=20, tolerance=1e-6, guess=g)[2])
             for g in ddim.GUESSES}
    assert spent["extrapolate"] < spent["naive"] and spent["previous"] < spent["naive"]
